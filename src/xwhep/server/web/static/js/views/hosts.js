// Hosts: who is alive, what each shares (app types, packages, data), and one host's record.

import {lineChart} from '../charts.js';
import {
  between, card, clear, duration, h, link, num, shortUid, statusPill, table, tags, when,
} from '../dom.js';
import {renderNotFound} from './errors.js';

const ALIVE_S = 120;  // a host silent for longer shows as gone (the server's default alive timeout)
const samples = {times: [], alive: []};  // hosts alive, sampled while the dashboard is open

function aliveNow(hst) {
  const s = between(hst.last_alive);
  return s !== null && s < ALIVE_S;
}

export async function renderList(root, params, ctx) {
  document.title = 'Hosts — xwhep';
  const admin = ctx.session.level === 'SUPER_USER';
  const body = h('div', {id: 'hosts'});
  const chartEl = h('div', {class: 'chart', id: 'chart-hosts'});
  clear(root, h('div', {class: 'page-head'}, h('h1', {}, admin ? 'Hosts (all)' : 'Hosts')),
    card('Hosts alive', chartEl), card(null, body));
  const chart = lineChart(chartEl, 'hosts alive', '#2f6fde');
  let busy = false;
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const list = await ctx.api('/hosts');
      const alive = list.filter(aliveNow).length;
      samples.times.push(Date.now() / 1000);
      samples.alive.push(alive);
      if (samples.times.length > 2000) { samples.times.shift(); samples.alive.shift(); }
      chart.update(samples.times, samples.alive);
      clear(body, table([
        {title: '', cell: (x) => h('span', {class: `dot ${aliveNow(x) ? 'on' : 'off'}`, role: 'img',
          'aria-label': aliveNow(x) ? 'alive' : 'silent'})},
        {title: 'Host', cell: (x) => link(`/ui/hosts/${x.uid}`, x.name)},
        admin ? {title: 'Owner', cell: (x) => h('code', {}, shortUid(x.owner))} : null,
        {title: 'Platform', cell: (x) => `${x.os}/${x.cpu}`},
        {title: 'Cores', cls: 'num', cell: (x) => num(x.cores)},
        {title: 'Memory', cls: 'num', cell: (x) => `${num(x.memory)} MiB`},
        {title: 'Running', cls: 'num', cell: (x) => num(x.running)},
        {title: 'State', cell: (x) => (x.active ? 'active' : h('span', {class: 'pill st-aborted'}, 'paused'))},
        {title: 'Shares', cell: (x) => tags([...(x.apptypes || []), ...Object.keys(x.packages || {}), ...(x.sharedatas || [])])},
        {title: 'Last alive', cell: (x) => when(x.last_alive)},
      ].filter(Boolean), list, {empty: 'No host registered yet. Start a worker: xwworker --config worker.conf',
        caption: 'hosts'}));
    } finally {
      busy = false;
    }
  }
  await refresh();
  const off = ctx.onChange(refresh);
  return () => { off(); chart.destroy(); };
}

export async function renderOne(root, [uid], ctx) {
  let rec;
  try {
    rec = await ctx.api(`/hosts/${encodeURIComponent(uid)}/stats`);
  } catch (exc) {
    if ([400, 403, 404].includes(exc.status)) return renderNotFound(root, 'host');
    throw exc;
  }
  const hst = rec.host;
  document.title = `Host ${hst.name} — xwhep`;
  const body = h('div');
  clear(root, h('div', {class: 'page-head'}, h('h1', {}, 'Host ', hst.name)), body);
  async function refresh() {
    rec = await ctx.api(`/hosts/${encodeURIComponent(uid)}/stats`);
    clear(body,
      h('div', {class: 'tiles'},
        h('div', {class: 'tile st-completed'}, h('span', {class: 'tile-label'}, 'Done'), h('span', {class: 'tile-value'}, num(rec.done))),
        h('div', {class: 'tile st-error'}, h('span', {class: 'tile-label'}, 'Failed'), h('span', {class: 'tile-value'}, num(rec.failed))),
        h('div', {class: 'tile st-aborted'}, h('span', {class: 'tile-label'}, 'Interrupted'), h('span', {class: 'tile-value'}, num(rec.interrupted))),
        h('div', {class: 'tile hosts'}, h('span', {class: 'tile-label'}, 'Time run'), h('span', {class: 'tile-value'}, duration(rec.run_seconds)))),
      card('Description', h('dl', {class: 'facts'},
        [['Platform', `${hst.os}/${hst.cpu}`], ['Cores', num(hst.cores)], ['Memory', `${num(hst.memory)} MiB`],
          ['Version', hst.version], ['Project', hst.project], ['Incoming connections', hst.incoming ? 'yes' : 'no'],
          ['App types', tags(hst.apptypes)], ['Packages', tags(Object.entries(hst.packages || {}).map(([k, v]) => `${k} ${v}`))],
          ['Data', tags(hst.sharedatas)], ['Last alive', when(hst.last_alive)], ['Registered', when(hst.created)]]
          .map(([k, v]) => h('div', {}, h('dt', {}, k), h('dd', {}, v ?? '—'))))),
      card('Latest tasks', table([
        {title: 'Work', cell: (t) => link(`/ui/works/${t.work}`, h('code', {}, shortUid(t.work)))},
        {title: '#', cls: 'num', cell: (t) => t.trial},
        {title: 'Status', cell: (t) => statusPill(t.status)},
        {title: 'Started', cell: (t) => when(t.started)},
        {title: 'Ran', cell: (t) => duration(between(t.started, t.ended))},
        {title: 'Exit', cls: 'num', cell: (t) => t.return_code ?? ''},
      ], rec.recent, {empty: 'This host has run nothing yet.', caption: 'tasks'})));
  }
  await refresh();
  return ctx.onChange(refresh);
}
