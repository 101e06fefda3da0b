/* django-comet browser client: Server-Sent Events with reconnect and Last-Event-ID,
 * falling back to long-poll where EventSource is missing or keeps failing (a proxy that
 * buffers or blocks streams), and trying streams again now and then.  No dependencies.
 *
 *   Comet.subscribe({
 *     sse: '/chat/events/',          // an event_stream() endpoint
 *     poll: '/chat/poll/',           // a long-poll endpoint: GET ?since=ID ->
 *                                    //   {"events": [{"id", "data"}], "last_id", "gap"?}
 *     onEvent: function (event) {},  // {id, data (parsed JSON), event (name)}; each id once
 *     onGap: function (info) {},     // history no longer reaches back: reload your state
 *     onState: function (mode) {},   // 'live (sse)', 'live (long-poll)', 'reconnecting…',
 *                                    //   'refused' (see onRefused), 'failed' (no stream
 *                                    //   it can open, and no poll)
 *     onRefused: function (info) {}, // {status, url}: the stream or poll endpoint
 *                                    //   answered with a client error (403:
 *                                    //   COMET_AUTHORIZE said no; 404) or an HTML page
 *                                    //   (a login page redirected to: status 200, url
 *                                    //   its address); asked again each minute, till
 *                                    //   close(); told once while it lasts (and to
 *                                    //   each tab that joins)
 *     events: ['message'],           // the event names to deliver (a list of names)
 *     forcePoll: false,
 *     pollTimeout: 60000,            // ms without an answer before a poll is retried
 *     openTimeout: 10000,            // ms for a stream's first frame to arrive
 *     streamAgain: 60000,            // ms in long-poll before a stream is tried again
 *     lastId: 0,                     // start after this event id (0: the history too)
 *     shareTabs: true,               // one connection for all tabs of this browser
 *     shareKey: ''                   // who is listening, when the stream depends on it
 *   }) -> {close: function () {}, lastId}
 *
 * Tabs of one browser share one connection per endpoint (with Web Locks and
 * BroadcastChannel, where the browser has both): over HTTP/1.1 a browser opens at most
 * six connections to a site, and a stream per tab would take them all.  The tab holding
 * the lock connects and passes every event on; the others listen, and a tab that joins
 * gets what the connected tab has seen.  When that tab closes, or goes into the
 * back/forward cache (it subscribes again if shown again), the next one takes the lock
 * and connects from its own last id.  Tabs share only what has the same endpoints
 * (resolved against the page), event names and shareKey: an endpoint whose events
 * depend on who is signed in must pass something that tells users apart (the user's
 * id, say) or shareTabs: false, or a tab signed in as one user would be handed the
 * stream opened for another.
 *
 * A stream counts as open when its first frame arrives (the server sends one at once),
 * not when its head does: a proxy that passes the head and buffers the body would
 * otherwise look live and show nothing.  A stream that stays silent for three of the
 * server's heartbeat intervals (it says how long they are) is taken for stalled, a
 * connection that died without closing, and reopened from the last id.  After three
 * failures with no frame ever, or three streams in a row that give no frame in time (a
 * proxy that holds them back, even on a page whose streams worked before), the
 * subscription falls back to long-poll, and tries a stream again after streamAgain,
 * then after twice as long each time (up to ten minutes).  A poll whose endpoint
 * answers with a first byte at once (poll_response does) and that gets none within
 * openTimeout is on a dead connection: it is retried at once.
 *
 * EventSource does not say why a stream failed.  When the browser gives a stream up
 * before its first frame (an HTTP error, or a page where the stream was due: it does
 * not retry those itself), the same URL is asked once more with XHR, which sees the
 * status.  A refusal goes on in long-poll, where there is a poll endpoint (a proxy may
 * refuse streams alone; a site that refuses the poll too says so there); without one
 * it is told as a poll's is, and asked again each minute.  Anything else (a 5xx, a
 * network error) is retried with backoff, as a server that is away.
 */
(function (global) {
  'use strict';

  var GAP_EVENT = 'comet-history-gap';
  var HEARTBEAT_EVENT = 'comet-heartbeat';  // data: the interval, in seconds
  var RECENT_FOR_TABS = 200;  // events the connected tab keeps for tabs that join
  var SSE_FAILURES_BEFORE_POLL = 3;
  var SSE_AGAIN_MAX = 600000;  // ms in long-poll before a stream is tried again, at most
  var REFUSED_AGAIN = 60000;  // ms before a refused poll is asked again (a login elsewhere)

  function subscribe(options) {
    // A mistake the page would otherwise never hear of (a string matched as a list of
    // letters, a listener never added in the tab that leads).
    var events = options.events;
    if (events !== undefined && !(Array.isArray(events) && events.length &&
        events.every(function (name) { return typeof name === 'string' && name; }))) {
      throw new TypeError('Comet.subscribe: events is a list of event names, like ' +
                          "['chat'], not " + JSON.stringify(events));
    }
    var lastId = Number(options.lastId) || 0;  // (one read back from storage is text)
    var closed = false;
    var sseFailures = 0;  // across EventSources: errors since the last successful open
    var sseOpened = false;  // whether a stream ever gave a frame, since the last fallback
    var sseStalls = 0;  // streams in a row that gave no frame in time, and no error either
    var source = null;
    var gotFrame = false;  // whether the stream's connection gave a frame yet
    var openTimeout = options.openTimeout || 10000;
    var pollsSayHello = false;  // the poll endpoint sends a first byte at once
    var fallbacks = 0;  // to long-poll, so far: each one waits longer to try streams again
    var polling = 0;  // the running poll loop's number (0: none); an old loop's callbacks stop
    var connected = false;  // this tab connects (unshared, or holding the lock)
    var pollNow = null;  // asks the running poll loop for its next poll at once
    var timer = null;  // the pending stream retry
    var againTimer = null;  // long-polling after a fallback: the next stream trial
    var pollTimer = null;  // the next poll
    var pollRequest = null;
    var probe = null;  // the XHR asking why the browser gave a stream up
    var beat = 0;  // the server's heartbeat interval (s), once a heartbeat told it
    var watchdog = null;  // reopens a stream that fell silent
    var userOnState = options.onState || function () {};
    var state = '';
    var refusal = null;  // the last refusal's {status, url}, for tabs that join
    var names = options.events || ['message'];
    // Sharing between tabs (see above).
    var shared = null;  // the BroadcastChannel, when sharing
    var leading = false;  // this tab holds the lock and the connection
    var joined = false;  // a follower got the connected tab's welcome
    var recent = [];  // the connected tab's latest events, for tabs that join
    // recent has every event after this id (as this tab saw them); from 0, the first
    // event tells (what was before it is out of the history).
    var coveredFrom = lastId || null;
    var releaseLock = null;
    var afterGap = false;  // the next event is taken whatever its id (ids may restart)
    var tab = Math.random().toString(36).slice(2);
    // The endpoints as the browser resolves them against the page: "events/" on two
    // pages may be two streams, which tabs must not share.
    var sseUrl = resolve(options.sse);
    var pollUrl = resolve(options.poll);

    function resolve(url) {
      if (!url) { return url; }
      // Against the document's base URL, as EventSource and XHR resolve them (a <base>).
      var base = (global.document && global.document.baseURI) || global.location.href;
      try { return new global.URL(url, base).href; } catch (e) { return url; }
    }

    // A callback that throws must not stop the subscription (nor the rest of a batch).
    function call(callback, value) {
      try { callback(value); } catch (e) { setTimeout(function () { throw e; }, 0); }
    }

    function deliver(id, data, name) {
      id = Number(id);
      if (closed) { return; }
      if (id && id <= lastId && !afterGap) { return; }  // seen (reconnects, mode switches)
      if (id) { lastId = id; afterGap = false; }
      if (shared) {  // kept by every tab: any may come to welcome the others
        // A copy, passed on before the page sees it: what its onEvent does to the data
        // (an element put in it, say) must not reach the other tabs, nor stop this one.
        var kept = { id: id, data: copy(data), name: name };
        if (coveredFrom === null) { coveredFrom = id - 1; }
        recent.push(kept);
        if (recent.length > RECENT_FOR_TABS) { coveredFrom = Math.max(coveredFrom, recent.shift().id); }
        if (leading) { shared.postMessage({ kind: 'event', id: id, data: kept.data, name: name }); }
      }
      call(options.onEvent, { id: id, data: data, event: name || 'message' });
    }

    // The cursor moves past what the server skipped (a poll's last_id, a heartbeat's
    // id, events of names not listened to), and the other tabs' with it: one that
    // takes over connects from there.
    function moveCursor(id) {
      if (!(id > lastId)) { return; }
      lastId = id;
      if (leading && shared && !closed) { shared.postMessage({ kind: 'cursor', id: id }); }
    }

    function copy(data) {  // (parsed JSON, or the text that was not JSON)
      return typeof data === 'object' && data !== null ? JSON.parse(JSON.stringify(data)) : data;
    }

    function onState(mode) {
      if (mode === state) { return; }
      state = mode;
      call(userOnState, mode);
      if (leading && shared && !closed) { shared.postMessage({ kind: 'state', mode: mode }); }
    }

    // Some events are gone.  The cursor stays (a reconnect asks from there, not for the
    // whole history), but the next event is taken even with a lower id: after a gap the
    // ids may have restarted (a reset database).  A gap with no event after it says
    // where to go on from instead (its "cursor"), past what is gone: from the same
    // cursor, every reconnect would hear of it again.
    function gap(info) {
      if (info && typeof info.last_event_id === 'number' && info.last_event_id < lastId) {
        return;  // told for a cursor this tab went past (a stream tried while polling)
      }
      if (info && typeof info.cursor === 'number') { lastId = info.cursor; }
      afterGap = true;
      if (options.onGap) { call(options.onGap, info); }
      // What follows the gap is all a tab can pass on: a tab at the cursor the gap was
      // told for missed what this one did.
      recent = []; coveredFrom = lastId + 1;
      if (leading && shared && !closed) { shared.postMessage({ kind: 'gap', info: info }); }
    }

    function withCursor(info, cursor) {  // (a copy: no Object.assign in old browsers)
      var copied = {};
      for (var key in info) {
        if (Object.prototype.hasOwnProperty.call(info, key)) { copied[key] = info[key]; }
      }
      copied.cursor = cursor;
      return copied;
    }

    function backoff(failures) {  // 1 s doubling to 30 s, with jitter so clients spread
      return Math.min(30000, 1000 * Math.pow(2, failures - 1)) * (0.5 + Math.random() / 2);
    }

    // An answer that retrying soon will not change: a client error (a refusal, an
    // endpoint that is not there), or an HTML page where JSON was due (a login page
    // that a redirect led to).  408 and 429 ask to be retried.
    function refusedBy(xhr) {
      var status = xhr.status;
      if (status >= 400 && status < 500) { return status !== 408 && status !== 429; }
      return status === 200 && /html/i.test(xhr.getResponseHeader('Content-Type') || '');
    }

    // A refusal is told once while it lasts (each minute's poll asks again).
    function refused(info) {
      if (state === 'refused') { return; }
      refusal = info;
      onState('refused');
      if (options.onRefused) { call(options.onRefused, info); }
      if (leading && shared && !closed) { shared.postMessage({ kind: 'refused', info: info }); }
    }

    function parse(text) {
      try { return JSON.parse(text); } catch (e) { return text; }
    }

    // Any sign of life from the stream puts off the watchdog: until the connection's
    // first frame, for openTimeout; then for three beats, once the server has said how
    // often it beats (a server without heartbeats may be silent for long).
    function alive() {
      if (watchdog) { clearTimeout(watchdog); watchdog = null; }
      if (!source || closed) { return; }
      var wait = gotFrame ? beat * 3000 : openTimeout;
      if (wait) { watchdog = setTimeout(stalled, wait); }
    }

    // Any frame: the stream flows (a head alone may come from a proxy that buffers).
    function frame() {
      if (!gotFrame) {
        gotFrame = true; sseOpened = true; sseFailures = 0; sseStalls = 0;
        stopPolling();  // a stream tried again while polling went on: it works now
        onState('live (sse)');
      }
      alive();
    }

    // No first frame in time, or silent for three beats: a connection that died without
    // closing, a reconnect that went out on one (the browser reuses idle connections), a
    // proxy that holds the stream back.  Closing the source drops it; start again.
    function stalled() {
      watchdog = null;
      if (closed || !source) { return; }
      source.close();
      source = null;
      sseFailures += 1;
      if (!gotFrame) { sseStalls += 1; }
      if (!polling) { onState('reconnecting…'); }  // (while it polls, it is live)
      retrySSE(sseFailures < 2 ? 0 : backoff(sseFailures));
    }

    // After a failure: a stream again after ``delay`` ms, or long-poll when streams never
    // gave a frame, or when they open but stay silent, even on a page whose streams once
    // worked (a proxy that took to buffering them: a laptop on another network).  Errors
    // alone, after streams worked, are the server away (a restart): streams again.
    function retrySSE(delay) {
      var blocked = !sseOpened && sseFailures >= SSE_FAILURES_BEFORE_POLL;
      if ((blocked || sseStalls >= SSE_FAILURES_BEFORE_POLL) && pollUrl) {
        if (polling) { streamAgainLater(); } else { startPoll(); }  // (a trial that failed)
      } else if (!delay) {
        startSSE();
      } else {
        timer = setTimeout(function () { timer = null; if (!closed) { startSSE(); } }, delay);
      }
    }

    function startSSE() {
      // lastEventId=0 asks for the history too, so that SSE and long-poll start alike.
      var url = sseUrl + sep(sseUrl) + 'lastEventId=' + lastId;
      var own;
      try {
        own = source = new global.EventSource(url);
      } catch (e) {  // a URL the browser refuses: long-poll, if there is one
        setTimeout(function () { throw e; }, 0);
        if (pollUrl) { startPoll(); } else { onState('failed'); }
        return;
      }
      gotFrame = false;
      own.onopen = alive;
      names.forEach(function (name) {
        own.addEventListener(name, function (e) { frame(); deliver(e.lastEventId, parse(e.data), name); });
      });
      own.addEventListener(HEARTBEAT_EVENT, function (e) {
        beat = Number(e.data) || 0;
        frame();
        // A stream with nothing to replay gives its cursor on the first heartbeat (and
        // events of names not listened to move it on): go on from there, as from a
        // poll's last_id, so that what a restart loses meanwhile is told.
        if (!afterGap) { moveCursor(Number(e.lastEventId)); }
      });
      alive();  // the first frame must come within openTimeout
      own.addEventListener(GAP_EVENT, function (e) {
        frame();
        gap(parse(e.data));  // the replay that follows may restart the ids (a restart)
      });
      own.onerror = function () {
        if (closed || own !== source) { return; }
        var hadFrame = gotFrame;
        gotFrame = false;
        alive();  // the browser's own reconnect must give a frame in time too
        sseFailures += 1;
        // The browser reconnects by itself (sending Last-Event-ID) while readyState is
        // CONNECTING, at the stream's retry: interval however often that fails: after a
        // second failure in a row, retry ourselves with backoff.  When it gives up at
        // the answer (CLOSED: an HTTP error, a login page), ask why first: a refusal is
        // not an outage (while polling, a stream trial's refusal shows in the polls).
        // After repeated failures without a frame ever, fall back to long-poll.
        var givenUp = source.readyState === global.EventSource.CLOSED;
        var asking = givenUp && !hadFrame && !polling;
        if (!polling && !asking) { onState('reconnecting…'); }
        if (givenUp || sseFailures >= 2) {
          source.close();
          source = null;
          if (watchdog) { clearTimeout(watchdog); watchdog = null; }
          if (asking) { askWhy(url); } else { retrySSE(backoff(sseFailures)); }
        }
      };
    }

    // The browser gave a stream up at its answer: ask the URL again, with XHR, to see
    // the status (and leave before the body, should it be a stream this time).
    function askWhy(url) {
      var xhr = probe = new XMLHttpRequest();
      function answered() {
        if (probe !== xhr || closed) { return; }  // (stopped, or the network came back)
        probe = null;
        // (Read before abort(), which makes the status 0.)
        var why = xhr.readyState >= 2 && refusedBy(xhr) &&
          { status: xhr.status, url: xhr.responseURL || url };
        xhr.abort();
        if (why && pollUrl) {
          // A proxy may refuse streams alone: the poll says whether the site refuses.
          startPoll();
        } else if (why) {
          sseFailures = 0;
          refused(why);
          timer = setTimeout(function () { timer = null; if (!closed) { startSSE(); } }, REFUSED_AGAIN);
        } else {
          onState('reconnecting…');
          retrySSE(backoff(sseFailures));
        }
      }
      xhr.open('GET', url);
      xhr.setRequestHeader('Accept', 'text/event-stream');
      xhr.timeout = openTimeout;
      xhr.onreadystatechange = function () { if (xhr.readyState >= 2) { answered(); } };
      xhr.onerror = xhr.ontimeout = answered;
      xhr.send();
    }

    function startPoll() {
      var failures = 0;
      var loop = polling = polling + 1;
      streamAgainLater();
      function next() {
        pollTimer = null;
        pollNow = next;
        if (closed || polling !== loop) { return; }
        var xhr = pollRequest = new XMLHttpRequest();
        var opening = null;
        var since = lastId;
        xhr.open('GET', pollUrl + sep(pollUrl) + 'since=' + since);
        xhr.timeout = options.pollTimeout || 60000;  // a stalled connection: retry
        // Answering (the server sends a first byte at once): live, though it may wait.
        xhr.onprogress = function () {
          if (opening) { clearTimeout(opening); opening = null; }
          // (Only what may be a poll's answer: a login page is no sign of life.)
          if (xhr.status === 200 && polling === loop && /^\s*(\{|$)/.test(xhr.responseText)) {
            // Whitespace before the JSON: this endpoint answers with a first byte at
            // once (poll_response does), so a poll that gives none is on a dead
            // connection (the browser reuses idle ones after a network blip).
            if (!xhr.responseText.trim()) { pollsSayHello = true; }
            onState('live (long-poll)');
          }
        };
        if (pollsSayHello) {
          opening = setTimeout(function () {
            opening = null;
            if (closed || polling !== loop) { return; }
            xhr.abort();  // (of the handlers below, calls onloadend only)
            failures += 1;
            onState('reconnecting…');
            pollTimer = setTimeout(next, failures < 2 ? 0 : backoff(failures));
          }, openTimeout);
        }
        xhr.onloadend = function () {
          if (opening) { clearTimeout(opening); opening = null; }
        };
        xhr.onload = function () {
          if (closed || polling !== loop) { return; }
          var body = null;
          if (xhr.status === 200) {
            try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
          }
          if (body && Array.isArray(body.events)) {
            // (An answer for a cursor this tab went past meanwhile, a stream tried again
            // having delivered newer events, says nothing of gaps or restarts.)
            if (since === lastId) {
              var restarted = body.last_id < lastId;  // the ids restarted: take what there is
              // (The cursor in the gap's info: the other tabs take it too.)
              if (restarted) { gap(withCursor(body, body.last_id)); }
              else if (body.gap) { gap(body); }
            }
            body.events.forEach(function (e) {
              var name = e.event || 'message';
              if (names.indexOf(name) !== -1) { deliver(e.id, e.data, name); }
              else { moveCursor(e.id); }  // not listened to: skip it
            });
            moveCursor(body.last_id);
            failures = 0;
            onState('live (long-poll)');
          } else if (refusedBy(xhr)) {
            failures = 0;
            refused({ status: xhr.status, url: xhr.responseURL || pollUrl });
            pollTimer = setTimeout(next, REFUSED_AGAIN);
            return;
          } else {
            failures += 1;
            onState('reconnecting…');
          }
          pollTimer = setTimeout(next, failures ? backoff(failures) : 0);
        };
        xhr.onerror = xhr.ontimeout = function () {
          if (closed || polling !== loop) { return; }
          failures += 1;
          onState('reconnecting…');
          pollTimer = setTimeout(next, backoff(failures));
        };
        xhr.send();
      }
      next();
    }

    function stopPolling() {
      if (!polling) { return; }
      polling = 0;  // the loop's callbacks and timers see it and stop
      if (pollRequest) { pollRequest.abort(); pollRequest = null; }
      if (pollTimer) { clearTimeout(pollTimer); pollTimer = null; }
    }

    // Long-polling after streams failed (not by choice): maybe they were blocked for a
    // while only.  Later, a stream is tried again, while polling goes on until the
    // stream's first frame (events are told apart by id).
    function streamAgainLater() {
      if (!(sseUrl && global.EventSource && !options.forcePoll)) { return; }
      fallbacks += 1;
      var first = options.streamAgain || 60000;
      var wait = Math.min(Math.max(first, SSE_AGAIN_MAX), first * Math.pow(2, fallbacks - 1));
      var loop = polling;
      if (againTimer) { clearTimeout(againTimer); }
      againTimer = setTimeout(function () {
        againTimer = null;
        if (closed || !polling || polling !== loop || source) { return; }
        sseFailures = 0; sseOpened = false; sseStalls = 0;
        startSSE();
      }, wait);
    }

    // The network is back: reconnect now rather than at the end of a backoff.
    function online() {
      if (closed || !connected || state.indexOf('live') === 0) { return; }
      if (polling) {  // (a stream trial's retry, if pending, stays)
        if (pollTimer) { clearTimeout(pollTimer); pollTimer = null; }
        if (pollRequest) { pollRequest.abort(); }  // (an aborted request calls nothing)
        pollNow();
        return;
      }
      if (timer) { clearTimeout(timer); timer = null; }
      if (source) { source.close(); source = null; }
      dropProbe();
      startSSE();
    }

    function sep(url) { return url.indexOf('?') === -1 ? '?' : '&'; }

    function connect() {
      connected = true;
      if (global.addEventListener) { global.addEventListener('online', online); }
      if (sseUrl && global.EventSource && !options.forcePoll) { startSSE(); }
      else if (pollUrl) { startPoll(); }
      else { onState('failed'); }  // no stream this browser can open, and no poll
    }

    // A follower: what the connected tab passes on, in the order it sent it.
    function heard(message) {
      if (closed || leading) { return; }
      var m = message.data;
      if (m.kind === 'welcome') {
        if (m.tab !== tab || joined) { return; }
        joined = true;
        if (m.gap) { gap(m.gap); }
        m.events.forEach(function (e) { deliver(e.id, e.data, e.name); });
        moveCursor(m.cursor);  // (what the connected tab went past)
        refusal = m.refusal || null;  // (to pass on, should this tab lead later)
        if (m.state) { state = m.state; call(userOnState, m.state); }
        if (m.state === 'refused' && m.refusal && options.onRefused) {
          call(options.onRefused, m.refusal);
        }
      } else if (m.kind === 'leader') {
        // A tab took over; one that said hello before (to no one, or to the tab that
        // was about to lead) says it again.
        if (!joined) { shared.postMessage({ kind: 'hello', tab: tab, lastId: lastId }); }
      } else if (m.kind === 'hello') {
        return;
      } else if (joined) {
        follow(m);
      }  // (before the welcome: what the connected tab sent before it is in it)
    }

    function follow(m) {
      if (m.kind === 'event') { deliver(m.id, m.data, m.name); }
      else if (m.kind === 'cursor') { moveCursor(m.id); }
      else if (m.kind === 'gap') { gap(m.info); }
      else if (m.kind === 'state') { state = m.mode; call(userOnState, m.mode); }
      else if (m.kind === 'refused') {
        refusal = m.info;
        if (options.onRefused) { call(options.onRefused, m.info); }
      }
    }

    // The connected tab: welcome a tab that joins with what it has seen since its id.
    function welcome(message) {
      var m = message.data;
      if (closed || !leading || m.kind !== 'hello') { return; }
      // A cursor ahead of this tab's is from before the ids went back (a reset
      // database; a cursor kept in storage): everything there is, after a gap, as the
      // server answers such a cursor.
      var ahead = lastId > 0 && m.lastId > lastId;
      var events = recent.filter(function (e) { return ahead || e.id > m.lastId; });
      // From before what this tab has seen all of: gone (a tab new to it, at 0, takes
      // what there is, as a new connection would).
      var missed = ahead || (m.lastId > 0 && coveredFrom !== null && m.lastId < coveredFrom);
      shared.postMessage({
        kind: 'welcome', tab: m.tab, events: events, state: state, refusal: refusal,
        gap: missed ? { last_event_id: m.lastId } : null, cursor: lastId
      });
    }

    var locks = global.navigator && global.navigator.locks;
    var sharing = options.shareTabs !== false && locks && global.BroadcastChannel;
    var key = 'django-comet ' + JSON.stringify(
      [sseUrl, pollUrl, names, !!options.forcePoll, String(options.shareKey || '')]);
    var queued = null;  // the lock request, while it waits behind another tab's
    var visits = 0;  // starts and stops: a lock granted to a stopped start leads nothing
    var hidden = false;  // in the back/forward cache

    function start() {
      var visit = visits += 1;
      if (!sharing) { connect(); return; }
      var channel = shared = new global.BroadcastChannel(key);
      channel.onmessage = function (message) {
        if (leading) { welcome(message); } else { heard(message); }
      };
      channel.postMessage({ kind: 'hello', tab: tab, lastId: lastId });
      var lead = function () {
        if (closed || visit !== visits) { return null; }
        leading = true;
        joined = true;
        channel.postMessage({ kind: 'leader' });
        connect();
        return new Promise(function (resolve) { releaseLock = resolve; });
      };
      // Aborted by stop(): a request left queued behind another tab's would keep this
      // subscription (and what it holds) until that tab let go.
      queued = global.AbortController ? new global.AbortController() : null;
      locks.request(key, queued ? { signal: queued.signal } : {}, lead).catch(function (e) {
        if (leading) { setTimeout(function () { throw e; }, 0); return; }  // lead()'s: shown
        // Refused (a sandboxed or opaque origin): connect on our own, unshared.
        if (!closed && visit === visits) { lead(); }
      });
    }

    // Lets go of the lock (or its queued request), the channel and the connection.
    function stop() {
      visits += 1;
      if (connected && global.removeEventListener) { global.removeEventListener('online', online); }
      connected = false; leading = false; joined = false;
      if (releaseLock) { releaseLock(); releaseLock = null; } else if (queued) { queued.abort(); }
      queued = null;
      if (shared) { shared.close(); shared = null; }
      if (source) { source.close(); source = null; }
      stopPolling();
      if (watchdog) { clearTimeout(watchdog); watchdog = null; }
      if (timer) { clearTimeout(timer); timer = null; }
      if (againTimer) { clearTimeout(againTimer); againTimer = null; }
      if (pollTimer) { clearTimeout(pollTimer); pollTimer = null; }
      if (pollRequest) { pollRequest.abort(); pollRequest = null; }
      dropProbe();
    }

    function dropProbe() {  // (its handlers, which abort() calls, see it is not the probe)
      var xhr = probe;
      probe = null;
      if (xhr) { xhr.abort(); }
    }

    // A page put in the back/forward cache (the user followed a link) would keep the
    // lock, and the other tabs would hear nothing until the browser evicted it: it lets
    // go, and subscribes again from its last id if it is shown again.
    function pagehide(event) {
      if (event.persisted && !closed && !hidden) { hidden = true; stop(); }
    }

    function pageshow(event) {
      if (!event.persisted || closed || !hidden) { return; }
      hidden = false;
      onState('reconnecting…');
      start();
    }

    if (global.addEventListener) {
      global.addEventListener('pagehide', pagehide);
      global.addEventListener('pageshow', pageshow);
    }
    start();

    return {
      close: function () {
        closed = true;
        if (global.removeEventListener) {
          global.removeEventListener('pagehide', pagehide);
          global.removeEventListener('pageshow', pageshow);
        }
        stop();
      },
      get lastId() { return lastId; }
    };
  }

  global.Comet = { subscribe: subscribe };
})(window);
