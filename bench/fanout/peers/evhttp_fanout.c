/* The fan-out endpoints of bench/fanout over libevent's evhttp with no Python: the
 * floor for django-comet, built and run in the same run as the other servers.
 *
 *   GET  /t/stream/?channels=C     chunked text/event-stream, held; one SSE frame per event
 *   GET  /t/poll/?channel=C        held; answered with the next event, then ended
 *   POST /t/publish/  channel=C&data=JSON: frame once, write to every holder of C
 *   GET  /t/count/?channel=C       {"subscribers": N}
 *
 * Usage: evhttp_fanout PORT   (listens on 127.0.0.1) */
#define _GNU_SOURCE /* asprintf */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/util.h>

#define BACKLOG 2048

struct holder {
    TAILQ_ENTRY(holder) next;
    struct evhttp_request *req;
    char *channel;
    int ends; /* a long-poll: ended by its event */
};
TAILQ_HEAD(holders, holder);

static struct holders held = TAILQ_HEAD_INITIALIZER(held);
static long last_id;

static void forget(struct holder *h)
{
    TAILQ_REMOVE(&held, h, next);
    free(h->channel);
    free(h);
}

static void client_left(struct evhttp_connection *evcon, void *arg)
{
    (void)evcon;
    forget(arg); /* evhttp frees the request */
}

static char *query_value(struct evhttp_request *req, const char *name)
{
    struct evkeyvalq query;
    const char *value;
    char *copy = NULL;
    if (evhttp_parse_query_str(evhttp_uri_get_query(evhttp_request_get_evhttp_uri(req)), &query))
        return NULL;
    if ((value = evhttp_find_header(&query, name)))
        copy = strdup(value);
    evhttp_clear_headers(&query);
    return copy;
}

static void reply(struct evhttp_request *req, int code, const char *type, const char *body)
{
    struct evbuffer *buf = evbuffer_new();
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", type);
    evbuffer_add(buf, body, strlen(body));
    evhttp_send_reply(req, code, code == 200 ? "OK" : "Bad Request", buf);
    evbuffer_free(buf);
}

static void hold(struct evhttp_request *req, const char *param, int ends)
{
    struct holder *h;
    char *channel = query_value(req, param);
    if (!channel) {
        reply(req, 400, "text/plain", "channel?");
        return;
    }
    h = calloc(1, sizeof *h);
    h->req = req;
    h->channel = channel;
    h->ends = ends;
    TAILQ_INSERT_TAIL(&held, h, next);
    evhttp_connection_set_closecb(evhttp_request_get_connection(req), client_left, h);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
                      ends ? "application/json" : "text/event-stream");
    evhttp_add_header(evhttp_request_get_output_headers(req), "Cache-Control", "no-cache");
    evhttp_send_reply_start(req, 200, "OK");
    if (!ends) {
        struct evbuffer *buf = evbuffer_new();
        evbuffer_add_printf(buf, ": subscribed\n\n");
        evhttp_send_reply_chunk(req, buf);
        evbuffer_free(buf);
    }
}

static void publish(struct evhttp_request *req)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t size = evbuffer_get_length(in);
    char *form = malloc(size + 1), *answer = NULL;
    struct evkeyvalq fields;
    const char *channel, *data;
    struct holder *h, *tmp;
    struct evbuffer *buf;
    char *frame = NULL, *event = NULL;
    size_t frame_size, event_size;

    evbuffer_remove(in, form, size);
    form[size] = '\0';
    if (evhttp_parse_query_str(form, &fields)) {
        free(form);
        reply(req, 400, "text/plain", "form?");
        return;
    }
    channel = evhttp_find_header(&fields, "channel");
    data = evhttp_find_header(&fields, "data");
    if (!channel || !data) {
        evhttp_clear_headers(&fields);
        free(form);
        reply(req, 400, "text/plain", "channel and data?");
        return;
    }
    last_id++;
    /* Each event framed once; every holder gets a copy of the same bytes. */
    if (asprintf(&frame, "id: %ld\ndata: %s\n\n", last_id, data) < 0 ||
        asprintf(&event, "{\"channel\": \"%s\", \"id\": %ld, \"data\": %s}", channel,
                 last_id, data) < 0)
        abort();
    frame_size = strlen(frame);
    event_size = strlen(event);
    buf = evbuffer_new();
    for (h = TAILQ_FIRST(&held); h; h = tmp) {
        tmp = TAILQ_NEXT(h, next);
        if (strcmp(h->channel, channel) != 0)
            continue;
        if (h->ends) {
            evhttp_connection_set_closecb(evhttp_request_get_connection(h->req), NULL, NULL);
            evbuffer_add(buf, event, event_size);
            evhttp_send_reply_chunk(h->req, buf);
            evhttp_send_reply_end(h->req);
            forget(h);
        } else {
            evbuffer_add(buf, frame, frame_size);
            evhttp_send_reply_chunk(h->req, buf);
        }
    }
    evbuffer_free(buf);
    free(frame);
    free(event);
    evhttp_clear_headers(&fields);
    free(form);
    if (asprintf(&answer, "{\"id\": %ld}", last_id) < 0)
        answer = NULL;
    reply(req, 200, "application/json", answer ? answer : "{}");
    free(answer);
}

static void count(struct evhttp_request *req)
{
    char body[64];
    long n = 0;
    struct holder *h;
    char *channel = query_value(req, "channel");
    if (channel)
        TAILQ_FOREACH(h, &held, next)
            n += strcmp(h->channel, channel) == 0;
    free(channel);
    snprintf(body, sizeof body, "{\"subscribers\": %ld}", n);
    reply(req, 200, "application/json", body);
}

static void route(struct evhttp_request *req, void *arg)
{
    const char *path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(req));
    (void)arg;
    if (!path)
        reply(req, 400, "text/plain", "path?");
    else if (strcmp(path, "/t/stream/") == 0)
        hold(req, "channels", 0);
    else if (strcmp(path, "/t/poll/") == 0)
        hold(req, "channel", 1);
    else if (strcmp(path, "/t/publish/") == 0)
        publish(req);
    else if (strcmp(path, "/t/count/") == 0)
        count(req);
    else
        reply(req, 404, "text/plain", "not found");
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    struct event_base *base = event_base_new();
    struct evhttp *http = evhttp_new(base);
    if (!base || !http)
        return 1;
    evhttp_set_allowed_methods(http, EVHTTP_REQ_GET | EVHTTP_REQ_POST);
    evhttp_set_gencb(http, route, NULL);
    /* The listen backlog the Python peers get (gunicorn --backlog, uvicorn --backlog). */
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) || listen(fd, BACKLOG) ||
        evutil_make_socket_nonblocking(fd) || !evhttp_accept_socket_with_handle(http, fd)) {
        fprintf(stderr, "cannot listen on 127.0.0.1:%s\n", argv[1]);
        return 1;
    }
    printf("Serving on http://127.0.0.1:%s/\n", argv[1]);
    fflush(stdout);
    return event_base_dispatch(base) == 0 ? 0 : 1;
}
