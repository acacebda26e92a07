import {card, clear, h} from '../dom.js';
import {renderBags} from './overview.js';

export async function render(root, params, ctx) {
  document.title = 'Groups and sessions — xwhep';
  const el = h('div', {id: 'bags'});
  const mine = h('p', {class: 'muted'});
  clear(root, h('div', {class: 'page-head'}, h('h1', {}, 'Groups and sessions')), mine, card(null, el));
  let busy = false;
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const sum = await ctx.api('/stats');
      const groups = await ctx.api('/usergroups').catch(() => []);
      const g = groups.find((x) => x.uid === ctx.session.usergroup);
      mine.textContent = g ? `You belong to the user group ${g.label}: its members' works that you may read count here.`
        : 'You belong to no user group: your own works and public ones count here.';
      renderBags(el, sum.bags);
    } finally {
      busy = false;
    }
  }
  await refresh();
  return ctx.onChange(refresh);
}
