/* "Hello, world!" over libevent's evhttp with no Python: the floor for django-comet.
 * Usage: evhttp_hello PORT   (listens on 127.0.0.1) */
#include <stdio.h>
#include <stdlib.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>

static const char BODY[] = "Hello, world!";

static void hello(struct evhttp_request *req, void *buf_arg)
{
    struct evbuffer *buf = buf_arg;
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "text/plain");
    evbuffer_add(buf, BODY, sizeof BODY - 1);
    evhttp_send_reply(req, 200, "OK", buf);  /* drains buf */
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    struct event_base *base = event_base_new();
    struct evhttp *http = evhttp_new(base);
    struct evbuffer *buf = evbuffer_new();
    if (!base || !http || !buf)
        return 1;
    evhttp_set_gencb(http, hello, buf);
    if (evhttp_bind_socket(http, "127.0.0.1", (ev_uint16_t)atoi(argv[1])) != 0) {
        fprintf(stderr, "cannot listen on 127.0.0.1:%s\n", argv[1]);
        return 1;
    }
    printf("Serving on http://127.0.0.1:%s/\n", argv[1]);
    fflush(stdout);
    return event_base_dispatch(base) == 0 ? 0 : 1;
}
