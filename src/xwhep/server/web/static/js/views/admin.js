// Administrators: users and their groups.

import {card, clear, h, shortUid, table, when} from '../dom.js';

export async function renderUsers(root, params, ctx) {
  document.title = 'Users — xwhep';
  const body = h('div', {id: 'users'});
  clear(root, h('div', {class: 'page-head'}, h('h1', {}, 'Users')), card(null, body));
  const [users, groups] = await Promise.all([ctx.api('/users'), ctx.api('/usergroups')]);
  const label = Object.fromEntries(groups.map((g) => [g.uid, g.label]));
  clear(body, table([
    {title: 'Login', cell: (u) => u.login},
    {title: 'Level', cell: (u) => h('span', {class: 'level'}, u.level)},
    {title: 'User group', cell: (u) => (u.usergroup ? label[u.usergroup] || shortUid(u.usergroup) : '')},
    {title: 'E-mail', cell: (u) => u.email || ''},
    {title: 'Identities', cell: (u) => [u.x509_dn ? 'X.509' : null, u.oidc_subject ? 'OIDC' : null].filter(Boolean).join(', ')},
    {title: 'Created', cell: (u) => when(u.created)},
  ], users, {caption: 'users'}));
  return null;
}
