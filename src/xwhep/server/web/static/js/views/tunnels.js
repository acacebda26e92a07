// Tunnels: the caller's running works with listen ports (how to reach them), its server proxies, open streams.

import {bytes, card, clear, h, link, num, shortUid, table, when} from '../dom.js';

export async function render(root, params, ctx) {
  document.title = 'Tunnels — xwhep';
  const worksEl = h('div', {id: 'tunnel-works'});
  const proxiesEl = h('div', {id: 'tunnel-proxies'});
  const relayEl = h('div', {id: 'relay'});
  clear(root, h('div', {class: 'page-head'}, h('h1', {}, 'Tunnels')),
    card('Running works with listen ports', worksEl), card('Server proxies connected', proxiesEl), relayEl);
  let busy = false;
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const [running, t] = await Promise.all([ctx.api('/works', {query: {status: 'RUNNING', limit: 2000}}),
        ctx.api('/stats/tunnels')]);
      const streams = Object.fromEntries(t.works.map((x) => [x.work, x]));
      const listening = running.items.filter((w) => w.listen_ports);
      clear(worksEl, table([
        {title: 'Work', cell: (w) => link(`/ui/works/${w.uid}`, h('code', {}, shortUid(w.uid)))},
        {title: 'Label', cell: (w) => w.label || ''},
        {title: 'Ports', cell: (w) => w.listen_ports},
        {title: 'Reach it with', cell: (w) => h('code', {}, `xwproxy ${w.uid} --xwlistenport ${w.listen_ports.split(',')[0]}`)},
        {title: 'Streams', cls: 'num', cell: (w) => num(streams[w.uid]?.streams || 0)},
        {title: 'Traffic', cls: 'num', cell: (w) => (streams[w.uid] ? `${bytes(streams[w.uid].bytes_up)} ↑ ${bytes(streams[w.uid].bytes_down)} ↓` : '—')},
      ], listening, {empty: 'None of your running works listens on a port.', caption: 'works with listen ports'}));
      clear(proxiesEl, table([
        {title: 'Address', cell: (p) => h('code', {}, p.address)},
        {title: 'Connected', cell: (p) => when(p.opened)},
        {title: 'Streams', cls: 'num', cell: (p) => num(p.streams)},
      ], t.proxies, {empty: 'No server proxy of yours is connected (xwproxy --xwserver …).', caption: 'server proxies'}));
      if (t.relay) {
        clear(relayEl, card('Relay (all users)', h('dl', {class: 'facts'}, Object.entries(t.relay).map(([k, v]) =>
          h('div', {}, h('dt', {}, k.replace('_', ' ')), h('dd', {}, num(v)))))));
      }
    } finally {
      busy = false;
    }
  }
  await refresh();
  return ctx.onChange(refresh);
}
