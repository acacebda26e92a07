// The volunteer's page: reads /api/status with the page's token (from the address' #token=…, kept in this tab's
// sessionStorage) every two seconds; the pause/resume button posts to /api/pause or /api/resume.

const KEY = 'xwhep.worker.token';
const view = document.getElementById('view');
const where = document.getElementById('where');

const m = location.hash.match(/token=([A-Za-z0-9_-]+)/);
if (m) {
  sessionStorage.setItem(KEY, m[1]);
  history.replaceState(null, '', location.pathname);  // the token leaves the address bar (and its history)
}
const token = sessionStorage.getItem(KEY);

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}

function duration(s) {
  if ((s || 0) < 10) return `${Math.max(0, s || 0).toFixed(1)} s`;
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

async function call(method, path) {
  const r = await fetch(path, {method, headers: {Authorization: `Bearer ${token}`, Accept: 'application/json'},
    cache: 'no-store'});
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || `${r.status}`);
  return data;
}

let busy = false;
let error = null;

function state(s) {
  const st = s.status || {};
  if (!st.pid) return ['Not started', 'off', 'The worker has not written its status yet.'];
  if (s.paused) return ['Paused', 'paused', (st.running || []).length ? 'Stopping its jobs: they go back to the server.'
    : 'You paused this worker: it runs nothing until you resume it.'];
  if (!st.active) return ['Inactive', 'paused', st.idle_reason || 'its activation policy says no'];
  if ((st.running || []).length) return ['Running', 'on', `${st.running.length} of ${st.pool} slot${st.pool === 1 ? '' : 's'} busy`];
  return ['Idle', 'idle', st.idle_reason || 'waiting for work'];
}

function tile(label, value, sub) {
  return h('div', {class: 'tile'}, h('span', {class: 'tile-label'}, label), h('span', {class: 'tile-value'}, value),
    sub ? h('span', {class: 'tile-sub'}, sub) : null);
}

function render(s) {
  const st = s.status || {};
  const [title, cls, why] = state(s);
  where.textContent = st.host ? `host ${st.host.slice(0, 8)} · ${s.server}` : s.server;
  const rec = s.record;
  const button = h('button', {type: 'button', id: 'toggle', class: s.paused ? 'primary' : 'secondary',
    'aria-pressed': String(s.paused), onclick: async () => {
      button.disabled = true;
      try { render(await call('POST', s.paused ? '/api/resume' : '/api/pause')); error = null; } catch (exc) { error = exc.message; }
      button.disabled = false;
    }}, s.paused ? 'Resume' : 'Pause');
  const running = st.running || [];
  const deliveries = (st.deliveries || []).filter((d) => d.last_error);
  view.replaceChildren(...[
    h('section', {class: `state state-${cls}`, 'aria-live': 'polite'},
      h('div', {}, h('h1', {id: 'state'}, title), h('p', {id: 'why'}, why)), button),
    error ? h('p', {class: 'error', role: 'alert'}, error) : null,
    h('div', {class: 'tiles'},
      tile('Jobs done', rec ? rec.done : '…', 'completed on this host'),
      tile('Failed', rec ? rec.failed : '…', rec && rec.interrupted ? `${rec.interrupted} interrupted` : 'errors, wall clock'),
      tile('CPU time given', duration(s.cpu_seconds), 'since the worker started'),
      tile('Results to deliver', String(st.results_pending ?? 0), deliveries.length ? `${deliveries.length} failing` : 'waiting for the server')),
    s.record_error ? h('p', {class: 'muted'}, `Statistics from the server unavailable: ${s.record_error}`) : null,
    h('section', {class: 'card'}, h('h2', {}, 'Running jobs'),
      running.length ? h('table', {id: 'jobs'}, h('thead', {}, h('tr', {}, ['Work', 'App', 'Phase', 'For'].map((x) => h('th', {scope: 'col'}, x)))),
        h('tbody', {}, running.map((j) => h('tr', {}, h('td', {}, h('code', {}, j.work.slice(0, 8))), h('td', {}, j.app),
          h('td', {}, j.phase), h('td', {}, duration(s.time - j.started))))))
        : h('p', {class: 'muted', id: 'no-jobs'}, 'No job right now.')),
    deliveries.length ? h('section', {class: 'card'}, h('h2', {}, 'Deliveries failing'),
      h('ul', {}, deliveries.map((d) => h('li', {}, `${d.step} of work ${d.work.slice(0, 8)}: ${d.last_error} (${d.attempts} attempts)`)))) : null,
    rec && rec.recent.length ? h('section', {class: 'card'}, h('h2', {}, 'Latest tasks'),
      h('table', {}, h('thead', {}, h('tr', {}, ['Work', 'Status', 'Ran', 'Exit'].map((x) => h('th', {scope: 'col'}, x)))),
        h('tbody', {}, rec.recent.map((t) => h('tr', {}, h('td', {}, h('code', {}, t.work.slice(0, 8))),
          h('td', {}, h('span', {class: `pill st-${t.status.toLowerCase()}`}, t.status)),
          h('td', {}, t.ended ? duration((Date.parse(t.ended) - Date.parse(t.started)) / 1000) : 'running'),
          h('td', {}, t.return_code ?? '')))))) : null,
    h('p', {class: 'muted foot'}, `Pause file: ${s.pause_file} · work directory ${s.workdir} · also: xwworker pause / xwworker resume`),
  ].filter(Boolean));
}

async function refresh() {
  if (busy) return;
  busy = true;
  try {
    render(await call('GET', '/api/status'));
  } catch (exc) {
    view.replaceChildren(h('section', {class: 'card', role: 'alert'}, h('h1', {}, 'Cannot read the worker\'s status'),
      h('p', {}, exc.message)));
  } finally {
    busy = false;
  }
}

if (!token) {
  view.replaceChildren(h('section', {class: 'card', role: 'alert'}, h('h1', {}, 'This page needs its key'),
    h('p', {}, 'Run ', h('code', {}, 'xwworker status --page'), ' and open the address it prints.')));
} else {
  refresh();
  setInterval(refresh, 2000);
}
