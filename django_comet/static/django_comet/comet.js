/* django-comet browser client: Server-Sent Events with reconnect and Last-Event-ID,
 * falling back to long-poll where EventSource is missing or keeps failing (a proxy that
 * buffers or blocks streams).  No dependencies.
 *
 *   Comet.subscribe({
 *     sse: '/chat/events/',          // an event_stream() endpoint
 *     poll: '/chat/poll/',           // a long-poll endpoint: GET ?since=ID ->
 *                                    //   {"events": [{"id", "data"}], "last_id", "gap"?}
 *     onEvent: function (event) {},  // {id, data (parsed JSON), event (name)}; each id once
 *     onGap: function (info) {},     // history no longer reaches back: reload your state
 *     onState: function (mode) {},   // 'live (sse)', 'live (long-poll)', 'reconnecting…'
 *     events: ['message'],           // SSE event names to listen to
 *     forcePoll: false
 *   }) -> {close: function () {}}
 */
(function (global) {
  'use strict';

  var GAP_EVENT = 'comet-history-gap';
  var SSE_FAILURES_BEFORE_POLL = 3;

  function subscribe(options) {
    var lastId = options.lastId || 0;
    var closed = false;
    var source = null;
    var pollTimer = null;
    var pollRequest = null;
    var onState = options.onState || function () {};
    var names = options.events || ['message'];

    function deliver(id, data, name) {
      id = Number(id);
      if (id && id <= lastId) { return; }  // seen already (reconnects, mode switches)
      if (id) { lastId = id; }
      options.onEvent({ id: id, data: data, event: name || 'message' });
    }

    function parse(text) {
      try { return JSON.parse(text); } catch (e) { return text; }
    }

    function startSSE() {
      var failures = 0;
      var opened = false;
      // lastEventId=0 asks for the history too, so that SSE and long-poll start alike.
      var url = options.sse + sep(options.sse) + 'lastEventId=' + lastId;
      source = new global.EventSource(url);
      source.onopen = function () { opened = true; failures = 0; onState('live (sse)'); };
      names.forEach(function (name) {
        source.addEventListener(name, function (e) { deliver(e.lastEventId, parse(e.data), name); });
      });
      source.addEventListener(GAP_EVENT, function (e) {
        lastId = 0;  // the replay that follows may restart the ids (a restarted server)
        if (options.onGap) { options.onGap(parse(e.data)); }
      });
      source.onerror = function () {
        if (closed) { return; }
        failures += 1;
        onState('reconnecting…');
        // The browser reconnects by itself (sending Last-Event-ID) while readyState is
        // CONNECTING; CLOSED means it gave up (an HTTP error): retry ourselves, and after
        // repeated failures without ever opening, fall back to long-poll.
        if (source.readyState === global.EventSource.CLOSED || (!opened && failures >= SSE_FAILURES_BEFORE_POLL)) {
          source.close();
          source = null;
          if (!opened && failures >= SSE_FAILURES_BEFORE_POLL) { startPoll(); }
          else { setTimeout(function () { if (!closed) { startSSE(); } }, 2000); }
        }
      };
    }

    function startPoll() {
      var delay = 0;
      function next() {
        if (closed) { return; }
        var xhr = pollRequest = new XMLHttpRequest();
        xhr.open('GET', options.poll + sep(options.poll) + 'since=' + lastId);
        xhr.onload = function () {
          var body = null;
          if (xhr.status === 200) {
            try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
          }
          if (body && body.events) {
            var restarted = body.last_id < lastId;  // the ids restarted: take what there is
            if (restarted) { lastId = 0; }
            if ((restarted || body.gap) && options.onGap) { options.onGap(body); }
            body.events.forEach(function (e) { deliver(e.id, e.data, 'message'); });
            if (body.last_id > lastId) { lastId = body.last_id; }
            delay = 0;
            onState('live (long-poll)');
          } else {
            delay = Math.min(30000, delay * 2 || 1000);
          }
          pollTimer = setTimeout(next, delay);
        };
        xhr.onerror = function () {
          delay = Math.min(30000, delay * 2 || 1000);
          onState('reconnecting…');
          pollTimer = setTimeout(next, delay);
        };
        xhr.send();
      }
      next();
    }

    function sep(url) { return url.indexOf('?') === -1 ? '?' : '&'; }

    if (options.sse && global.EventSource && !options.forcePoll) { startSSE(); }
    else { startPoll(); }

    return {
      close: function () {
        closed = true;
        if (source) { source.close(); }
        if (pollTimer) { clearTimeout(pollTimer); }
        if (pollRequest) { pollRequest.abort(); }
      },
      get lastId() { return lastId; }
    };
  }

  global.Comet = { subscribe: subscribe };
})(window);
