// Live updates, behind one small interface: views call onChange(fn) and re-read what they show when told.
//
// Source: the server's event stream (GET /api/v1/events/stream, Server-Sent Events) when the server has it, read
// with fetch() so that the request carries the Authorization header like every other call (EventSource cannot
// send one); otherwise, or while the stream is down, a poll every POLL_MS. Views never know which one runs.
// docs/dashboard.md says what the dashboard expects of the stream.

import {authHeader} from './api.js';

const POLL_MS = 1500;
const SAFETY_MS = 15000;  // with the stream up, still refresh this often (a view may show time-dependent facts)
const MIN_GAP_MS = 400;  // a burst of events makes one refresh, not one per event

const subscribers = new Set();
let state = {mode: 'off', timer: null, abort: null, lastId: null, pending: null, lastFire: 0};
const modeListeners = new Set();

export function onChange(fn) {
  subscribers.add(fn);
  return () => subscribers.delete(fn);
}

export function onMode(fn) {
  modeListeners.add(fn);
  fn(state.mode);
  return () => modeListeners.delete(fn);
}

function setMode(mode) {
  state.mode = mode;
  for (const fn of modeListeners) fn(mode);
}

function fire(reason) {
  const now = Date.now();
  const wait = state.lastFire + MIN_GAP_MS - now;
  if (wait > 0) {
    if (!state.pending) state.pending = setTimeout(() => { state.pending = null; fire(reason); }, wait);
    return;
  }
  state.lastFire = now;
  for (const fn of subscribers) {
    try { fn(reason); } catch (exc) { console.error(exc); }
  }
}

function poll(interval) {
  clearInterval(state.timer);
  state.timer = setInterval(() => fire('poll'), interval);
}

export function start() {
  stop();
  setMode('polling');
  poll(POLL_MS);
  stream();
}

export function stop() {
  clearInterval(state.timer);
  clearTimeout(state.pending);
  if (state.abort) state.abort.abort();
  state = {mode: 'off', timer: null, abort: null, lastId: state.lastId, pending: null, lastFire: 0};
  setMode('off');
}

// Server-Sent Events over fetch: `id:`, `event:`, `data:` lines, a blank line ends an event.
async function stream(delay = 0) {
  const abort = new AbortController();
  state.abort = abort;
  if (delay) await new Promise((r) => setTimeout(r, delay));
  if (abort.signal.aborted) return;
  let resp;
  try {
    const headers = {Accept: 'text/event-stream', ...authHeader()};
    if (state.lastId) headers['Last-Event-ID'] = state.lastId;
    resp = await fetch('/api/v1/events/stream', {headers, signal: abort.signal, cache: 'no-store'});
  } catch {
    if (!abort.signal.aborted) stream(Math.min(30000, (delay || 1000) * 2));
    return;
  }
  const type = resp.headers.get('content-type') || '';
  if (!resp.ok || !type.startsWith('text/event-stream') || !resp.body) {
    // no stream on this server (404), or not for us now: polling goes on; look again later
    if (resp.status !== 401 && !abort.signal.aborted) setTimeout(() => { if (!abort.signal.aborted) stream(); }, 60000);
    return;
  }
  setMode('streaming');
  poll(SAFETY_MS);
  fire('stream-open');
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += value;
      let cut;
      while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut).replace(/^\r?\n\r?\n/, '');
        let id = null;
        let data = false;
        for (const line of block.split(/\r?\n/)) {
          if (line.startsWith('id:')) id = line.slice(3).trim();
          else if (line.startsWith('data:')) data = true;
        }
        if (id) state.lastId = id;
        if (data) fire('event');
      }
    }
  } catch {
    /* the connection broke: fall through to reconnecting */
  }
  if (abort.signal.aborted) return;
  setMode('polling');
  poll(POLL_MS);
  stream(2000);
}
