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
 *     forcePoll: false,
 *     pollTimeout: 60000,            // ms without an answer before a poll is retried
 *     shareTabs: true                // one connection for all tabs of this browser
 *   }) -> {close: function () {}}
 *
 * Tabs of one browser share one connection per endpoint (with Web Locks and
 * BroadcastChannel, where the browser has both): over HTTP/1.1 a browser opens at most
 * six connections to a site, and a stream per tab would take them all.  The tab holding
 * the lock connects and passes every event on; the others listen, and a tab that joins
 * gets what the connected tab has seen.  When that tab closes, the next one takes the
 * lock and connects from its own last id.
 *
 * A stream that stays silent for three of the server's heartbeat intervals (it says
 * how long they are) is taken for stalled, a connection that died without closing,
 * and reopened from the last id.
 */
(function (global) {
  'use strict';

  var GAP_EVENT = 'comet-history-gap';
  var HEARTBEAT_EVENT = 'comet-heartbeat';  // data: the interval, in seconds
  var RECENT_FOR_TABS = 200;  // events the connected tab keeps for tabs that join
  var SSE_FAILURES_BEFORE_POLL = 3;

  function subscribe(options) {
    var lastId = options.lastId || 0;
    var closed = false;
    var sseFailures = 0;  // across EventSources: errors since the last successful open
    var sseOpened = false;  // whether any EventSource ever opened
    var source = null;
    var timer = null;  // the pending retry, or the next poll
    var pollRequest = null;
    var beat = 0;  // the server's heartbeat interval (s), once a heartbeat told it
    var watchdog = null;  // reopens a stream that fell silent
    var userOnState = options.onState || function () {};
    var state = '';
    var names = options.events || ['message'];
    // Sharing between tabs (see above).
    var shared = null;  // the BroadcastChannel, when sharing
    var leading = false;  // this tab holds the lock and the connection
    var joined = false;  // a follower got the connected tab's welcome
    var pending = [];  // what a follower heard before its welcome
    var recent = [];  // the connected tab's latest events, for tabs that join
    var trimmed = false;  // whether recent has let some go
    var releaseLock = null;
    var afterGap = false;  // the next event is taken whatever its id (ids may restart)
    var tab = Math.random().toString(36).slice(2);

    // A callback that throws must not stop the subscription (nor the rest of a batch).
    function call(callback, value) {
      try { callback(value); } catch (e) { setTimeout(function () { throw e; }, 0); }
    }

    function deliver(id, data, name) {
      id = Number(id);
      if (closed) { return; }
      if (id && id <= lastId && !afterGap) { return; }  // seen (reconnects, mode switches)
      if (id) { lastId = id; afterGap = false; }
      call(options.onEvent, { id: id, data: data, event: name || 'message' });
      if (closed) { return; }  // closed by onEvent
      if (shared) {  // kept by every tab: any may come to welcome the others
        recent.push({ id: id, data: data, name: name });
        if (recent.length > RECENT_FOR_TABS) { recent.shift(); trimmed = true; }
        if (leading) { shared.postMessage({ kind: 'event', id: id, data: data, name: name }); }
      }
    }

    function onState(mode) {
      state = mode;
      call(userOnState, mode);
      if (leading && shared && !closed) { shared.postMessage({ kind: 'state', mode: mode }); }
    }

    // Some events are gone.  The cursor stays (a reconnect asks from there, not for the
    // whole history), but the next event is taken even with a lower id: after a gap the
    // ids may have restarted (a reset database).
    function gap(info) {
      afterGap = true;
      if (options.onGap) { call(options.onGap, info); }
      recent = []; trimmed = false;
      if (leading && shared && !closed) { shared.postMessage({ kind: 'gap', info: info }); }
    }

    function backoff(failures) {  // 1 s doubling to 30 s, with jitter so clients spread
      return Math.min(30000, 1000 * Math.pow(2, failures - 1)) * (0.5 + Math.random() / 2);
    }

    function parse(text) {
      try { return JSON.parse(text); } catch (e) { return text; }
    }

    // Any sign of life from the stream puts off the watchdog (armed once the server has
    // said how often it beats: a server without heartbeats may be silent for long).
    function alive() {
      if (watchdog) { clearTimeout(watchdog); watchdog = null; }
      if (beat && source && !closed) { watchdog = setTimeout(stalled, beat * 3000); }
    }

    // Silent for three beats: a connection that died without closing, or a reconnect
    // that went out on one (the browser reuses idle connections).  Closing the source
    // drops it; reopen from the last id, at once the first time, then with backoff.
    function stalled() {
      watchdog = null;
      if (closed || !source) { return; }
      source.close();
      source = null;
      sseFailures += 1;
      onState('reconnecting…');
      if (sseFailures < 2) { startSSE(); }
      else { timer = setTimeout(function () { if (!closed) { startSSE(); } }, backoff(sseFailures)); }
    }

    function startSSE() {
      // lastEventId=0 asks for the history too, so that SSE and long-poll start alike.
      var url = options.sse + sep(options.sse) + 'lastEventId=' + lastId;
      var own = source = new global.EventSource(url);
      own.onopen = function () {
        sseOpened = true; sseFailures = 0; onState('live (sse)'); alive();
      };
      names.forEach(function (name) {
        own.addEventListener(name, function (e) { alive(); deliver(e.lastEventId, parse(e.data), name); });
      });
      own.addEventListener(HEARTBEAT_EVENT, function (e) {
        beat = Number(e.data) || 0;
        alive();
      });
      alive();  // a reconnect must open within three beats too
      own.addEventListener(GAP_EVENT, function (e) {
        alive();
        gap(parse(e.data));  // the replay that follows may restart the ids (a restart)
      });
      own.onerror = function () {
        if (closed || own !== source) { return; }
        alive();  // the browser's own reconnect must open within three beats too
        sseFailures += 1;
        onState('reconnecting…');
        // The browser reconnects by itself (sending Last-Event-ID) while readyState is
        // CONNECTING, at the stream's retry: interval however often that fails: after a
        // second failure in a row, and when it gives up (CLOSED: an HTTP error, a
        // proxy's page), retry ourselves with backoff.  After repeated failures without
        // ever opening, fall back to long-poll.
        var giveUp = !sseOpened && sseFailures >= SSE_FAILURES_BEFORE_POLL;
        if (source.readyState === global.EventSource.CLOSED || sseFailures >= 2 || giveUp) {
          source.close();
          source = null;
          if (giveUp) { startPoll(); }
          else { timer = setTimeout(function () { if (!closed) { startSSE(); } }, backoff(sseFailures)); }
        }
      };
    }

    function startPoll() {
      var failures = 0;
      function next() {
        if (closed) { return; }
        var xhr = pollRequest = new XMLHttpRequest();
        xhr.open('GET', options.poll + sep(options.poll) + 'since=' + lastId);
        xhr.timeout = options.pollTimeout || 60000;  // a stalled connection: retry
        xhr.onload = function () {
          var body = null;
          if (xhr.status === 200) {
            try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
          }
          if (body && body.events) {
            var restarted = body.last_id < lastId;  // the ids restarted: take what there is
            if (restarted) { lastId = body.last_id; }
            if (restarted || body.gap) { gap(body); }
            body.events.forEach(function (e) {
              var name = e.event || 'message';
              if (names.indexOf(name) !== -1) { deliver(e.id, e.data, name); }
              else if (e.id > lastId) { lastId = e.id; }  // not listened to: skip it
            });
            if (body.last_id > lastId) { lastId = body.last_id; }
            failures = 0;
            onState('live (long-poll)');
          } else {
            failures += 1;
          }
          timer = setTimeout(next, failures ? backoff(failures) : 0);
        };
        xhr.onerror = xhr.ontimeout = function () {
          failures += 1;
          onState('reconnecting…');
          timer = setTimeout(next, backoff(failures));
        };
        xhr.send();
      }
      next();
    }

    function sep(url) { return url.indexOf('?') === -1 ? '?' : '&'; }

    function connect() {
      if (options.sse && global.EventSource && !options.forcePoll) { startSSE(); }
      else { startPoll(); }
    }

    // A follower: what the connected tab passes on, in the order it sent it.
    function heard(message) {
      if (closed || leading) { return; }
      var m = message.data;
      if (m.kind === 'welcome') {
        if (m.tab !== tab || joined) { return; }
        joined = true;
        pending = [];  // sent before the welcome, by the same tab: in it already
        if (m.gap) { gap(m.gap); }
        m.events.forEach(function (e) { deliver(e.id, e.data, e.name); });
        if (m.state) { state = m.state; call(userOnState, m.state); }
      } else if (m.kind === 'leader') {
        // A tab took over; one that said hello before (to no one, or to the tab that
        // was about to lead) says it again.
        if (!joined) { shared.postMessage({ kind: 'hello', tab: tab, lastId: lastId }); }
      } else if (m.kind === 'hello') {
        return;
      } else if (!joined) {
        pending.push(m);
      } else {
        follow(m);
      }
    }

    function follow(m) {
      if (m.kind === 'event') { deliver(m.id, m.data, m.name); }
      else if (m.kind === 'gap') { gap(m.info); }
      else if (m.kind === 'state') { state = m.mode; call(userOnState, m.mode); }
    }

    // The connected tab: welcome a tab that joins with what it has seen since its id.
    function welcome(message) {
      var m = message.data;
      if (closed || !leading || m.kind !== 'hello') { return; }
      var events = recent.filter(function (e) { return e.id > m.lastId; });
      var missed = trimmed && m.lastId > 0 && (!recent.length || recent[0].id > m.lastId + 1);
      shared.postMessage({
        kind: 'welcome', tab: m.tab, events: events, state: state,
        gap: missed ? { last_event_id: m.lastId } : null
      });
    }

    var locks = global.navigator && global.navigator.locks;
    if (options.shareTabs !== false && locks && global.BroadcastChannel) {
      var key = 'django-comet ' + JSON.stringify([options.sse, options.poll, names, !!options.forcePoll]);
      shared = new global.BroadcastChannel(key);
      shared.onmessage = function (message) {
        if (leading) { welcome(message); } else { heard(message); }
      };
      shared.postMessage({ kind: 'hello', tab: tab, lastId: lastId });
      var lead = function () {
        if (closed) { return null; }
        leading = true;
        joined = true;
        pending = [];  // what was passed on before is in the replay from lastId
        shared.postMessage({ kind: 'leader' });
        connect();
        return new Promise(function (resolve) { releaseLock = resolve; });
      };
      locks.request(key, lead).catch(function () {
        // Refused (a sandboxed or opaque origin): connect on our own, unshared.
        if (!leading && !closed) { lead(); }
      });
    } else {
      connect();
    }

    return {
      close: function () {
        closed = true;
        if (releaseLock) { releaseLock(); }
        if (shared) { shared.close(); }
        if (source) { source.close(); }
        if (watchdog) { clearTimeout(watchdog); }
        if (timer) { clearTimeout(timer); }
        if (pollRequest) { pollRequest.abort(); }
      },
      get lastId() { return lastId; }
    };
  }

  global.Comet = { subscribe: subscribe };
})(window);
