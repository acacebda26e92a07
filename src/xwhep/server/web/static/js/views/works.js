// Works: the list (filtered by status, label, group, session) and one work's life.

import {
  between, bytes, card, clear, duration, h, link, num, shortUid, statusPill, STATUS_ORDER, table, when,
} from '../dom.js';
import {renderNotFound} from './errors.js';

const LIMIT = 500;

export async function renderList(root, params, ctx) {
  document.title = 'Works — xwhep';
  const q = new URLSearchParams(location.search);
  const filters = {status: q.get('status') || '', label: q.get('label') || '', group: q.get('group') || '',
    session: q.get('session') || ''};
  const body = h('div', {id: 'works'});
  const count = h('p', {class: 'muted', id: 'works-count'});
  const status = h('select', {id: 'f-status', onchange: () => apply()},
    h('option', {value: ''}, 'any status'), STATUS_ORDER.map((s) => h('option', {value: s}, s.toLowerCase())));
  status.value = filters.status;
  const label = h('input', {id: 'f-label', placeholder: 'label', value: filters.label, onchange: () => apply()});
  function apply() {
    const next = new URLSearchParams();
    if (status.value) next.set('status', status.value);
    if (label.value) next.set('label', label.value);
    if (filters.group) next.set('group', filters.group);
    if (filters.session) next.set('session', filters.session);
    ctx.navigate(`/ui/works${[...next].length ? `?${next}` : ''}`, true);
  }
  const bagNote = filters.group || filters.session
    ? h('p', {}, `In ${filters.group ? 'group' : 'session'} ${shortUid(filters.group || filters.session)} · `,
      link('/ui/works', 'all works')) : null;
  clear(root, h('div', {class: 'page-head'}, h('h1', {}, 'Works'),
    h('div', {class: 'filters'}, h('label', {for: 'f-status', class: 'sr-only'}, 'Status'), status,
      h('label', {for: 'f-label', class: 'sr-only'}, 'Label'), label)), bagNote, count, card(null, body));
  let busy = false;
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const out = await ctx.api('/works', {query: {...filters, limit: LIMIT}});
      count.textContent = out.next ? `The first ${num(out.items.length)} works (oldest first).`
        : `${num(out.items.length)} work${out.items.length === 1 ? '' : 's'}.`;
      clear(body, table([
        {title: 'Work', cell: (w) => link(`/ui/works/${w.uid}`, h('code', {}, shortUid(w.uid)))},
        {title: 'App', cell: (w) => w.app_name},
        {title: 'Label', cell: (w) => w.label || ''},
        {title: 'Status', cell: (w) => statusPill(w.status)},
        {title: 'Exit', cls: 'num', cell: (w) => (w.return_code ?? '')},
        {title: 'Submitted', cell: (w) => when(w.created)},
        {title: 'Changed', cell: (w) => when(w.modified)},
      ], out.items, {empty: 'No works match.', caption: 'works'}));
    } finally {
      busy = false;
    }
  }
  await refresh();
  return ctx.onChange(refresh);
}

function facts(pairs) {
  return h('dl', {class: 'facts'}, pairs.filter(([, v]) => v !== undefined).map(([k, v]) =>
    h('div', {}, h('dt', {}, k), h('dd', {}, v ?? h('span', {class: 'muted'}, '—')))));
}

export async function renderOne(root, [uid], ctx) {
  let work;
  try {
    work = await ctx.api(`/works/${encodeURIComponent(uid)}`);
  } catch (exc) {
    if (exc.status === 404 || exc.status === 403 || exc.status === 400) return renderNotFound(root, 'work');
    throw exc;
  }
  document.title = `Work ${shortUid(work.uid)} — xwhep`;
  const head = h('div', {class: 'page-head'});
  const summary = h('div', {id: 'work-facts'});
  const whyEl = h('div', {id: 'why'});
  const tasksEl = h('div', {id: 'tasks'});
  const eventsEl = h('div', {id: 'events'});
  const logsEl = h('div', {id: 'logs'});
  const whyCard = card('Why is it pending?', whyEl);
  clear(root, head, card(null, summary), whyCard,
    h('div', {class: 'grid-2'}, card('Tasks (attempts)', tasksEl), card('Logs', logsEl)),
    card('Events', eventsEl));

  let lastStatus = null;
  let busy = false;
  let gone = false;
  async function refresh() {
    if (busy || gone) return;
    busy = true;
    try {
      work = await ctx.api(`/works/${encodeURIComponent(uid)}`);
      const [tasks, events] = await Promise.all([ctx.api(`/works/${work.uid}/tasks`),
        ctx.api('/events', {query: {object: work.uid, limit: 200}})]);
      clear(head, h('h1', {}, 'Work ', h('code', {}, shortUid(work.uid))), statusPill(work.status),
        work.label ? h('span', {class: 'subtitle'}, work.label) : null);
      clear(summary, facts([
        ['App', work.app_name], ['Arguments', work.args ? h('code', {}, work.args) : null],
        ['Status', work.status + (work.return_code !== null && work.return_code !== undefined ? ` (exit ${work.return_code})` : '')],
        ['Reason', work.reason], ['Submitted', when(work.created)], ['Started', when(work.started)],
        ['Finished', when(work.completed)],
        ['Run time', work.started ? duration(between(work.started, work.completed)) : null],
        ['Retries', `${work.retries} of ${work.max_retries}`],
        ['Group', work.group ? link(`/ui/works?group=${work.group}`, shortUid(work.group)) : null],
        ['Host', work.host ? link(`/ui/hosts/${work.host}`, shortUid(work.host)) : null],
        ['Result', work.result_sha256 ? `${bytes(work.result_size)} · sha256 ${work.result_sha256.slice(0, 12)}…` : null],
        ['Tunnels', work.tunnels ? work.tunnels.join(', ') : undefined],
        ['Rights', work.access_rights], ['URI', h('code', {}, work.uri)],
      ]));
      clear(tasksEl, table([
        {title: '#', cls: 'num', cell: (t) => t.trial},
        {title: 'Host', cell: (t) => link(`/ui/hosts/${t.host}`, h('code', {}, shortUid(t.host)))},
        {title: 'Status', cell: (t) => statusPill(t.status)},
        {title: 'Started', cell: (t) => when(t.started)},
        {title: 'Ran', cell: (t) => duration(between(t.started, t.ended))},
        {title: 'Exit', cls: 'num', cell: (t) => t.return_code ?? ''},
        {title: 'Reason', cell: (t) => t.reason || ''},
      ], tasks, {empty: 'No attempt yet.', caption: 'tasks'}));
      clear(eventsEl, h('ol', {class: 'timeline'}, [...events].reverse().map((e) => h('li', {},
        h('span', {class: 'ev-time'}, when(e.time)),
        h('span', {class: 'ev-action'}, e.action),
        e.source || e.target ? h('span', {class: 'ev-move'}, e.source ? statusPill(e.source) : null,
          e.source && e.target ? ' → ' : null, e.target ? statusPill(e.target) : null) : null,
        e.detail ? h('span', {class: 'ev-detail'}, e.detail) : null))));
      if (work.status !== lastStatus) {  // why and logs change with the status only
        lastStatus = work.status;
        await Promise.all([renderWhy(whyCard, whyEl, work, ctx), renderLogs(logsEl, work, ctx)]);
      }
    } catch (exc) {
      if (exc.status === 404) { gone = true; renderNotFound(root, 'work'); return; }  // deleted meanwhile
      throw exc;
    } finally {
      busy = false;
    }
  }
  await refresh();
  return ctx.onChange(refresh);
}

async function renderWhy(cardEl, el, work, ctx) {
  if (!['PENDING', 'UNAVAILABLE'].includes(work.status)) {
    cardEl.hidden = true;
    return;
  }
  cardEl.hidden = false;
  const why = await ctx.api(`/works/${work.uid}/why`);
  clear(el,
    h('p', {class: 'why-summary'},
      `${num(why.matching_alive)} of ${num(why.hosts_alive)} hosts alive can run it; `,
      `${num(why.pending_ahead)} pending work${why.pending_ahead === 1 ? '' : 's'} ahead of it.`,
      why.note ? ` ${why.note}` : ''),
    table([
      {title: 'Requirement', cell: (r) => r.name},
      {title: 'Hosts that satisfy it', cls: 'num', cell: (r) => `${num(r.satisfied_by)} of ${num(r.of)}`},
      {title: '', cell: (r) => (r.satisfied_by === 0 ? h('span', {class: 'pill st-error'}, 'blocking') : '')},
      {title: 'Example of a host that fails it', cell: (r) => r.example_failure || ''},
    ], why.requirements, {empty: 'No requirement to check.', caption: 'requirements'}));
}

async function renderLogs(el, work, ctx) {
  const logs = await ctx.api(`/works/${work.uid}/logs`);
  const parts = [];
  if (logs.note) parts.push(h('p', {class: 'muted'}, `No logs: ${logs.note}.`));
  for (const stream of ['stdout', 'stderr']) {
    const s = logs[stream];
    if (!s) continue;
    parts.push(h('h3', {}, stream, h('span', {class: 'muted'}, ` · ${bytes(s.size)}${s.truncated ? ', the end shown' : ''}`)),
      h('pre', {class: `log log-${stream}`, tabindex: 0}, s.text || '(empty)'));
  }
  if (!logs.note && !logs.stdout && !logs.stderr) parts.push(h('p', {class: 'muted'}, 'The job wrote nothing on stdout or stderr.'));
  if (logs.files.length) {
    parts.push(h('h3', {}, 'Files in the result'),
      h('ul', {class: 'files'}, logs.files.map((f) => h('li', {}, h('code', {}, f.name), ' ', h('span', {class: 'muted'}, bytes(f.size))))));
  }
  clear(el, parts);
}
