// The one way the dashboard talks to the server: the JSON API with the user's own bearer token. The token lives
// in sessionStorage (this tab only, gone when it closes); nothing else is stored.

const KEY = 'xwhep.session';
const listeners = new Set();

export class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

export const session = {
  get() {
    try {
      const s = JSON.parse(sessionStorage.getItem(KEY) || 'null');
      return s && s.expires > Date.now() ? s : null;
    } catch {
      return null;
    }
  },
  set(s) { sessionStorage.setItem(KEY, JSON.stringify(s)); },
  clear() { sessionStorage.removeItem(KEY); },
};

// told when the server refuses the token (expired, revoked): the app goes back to the login page
export function onSessionLost(fn) { listeners.add(fn); }

export function authHeader() {
  const s = session.get();
  return s ? {Authorization: `Bearer ${s.token}`} : {};
}

export async function api(path, {method = 'GET', body, signal, query} = {}) {
  const headers = {Accept: 'application/json', ...authHeader()};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let url = `/api/v1${path}`;
  if (query) {
    const q = new URLSearchParams(Object.entries(query).filter(([, v]) => v !== undefined && v !== null && v !== ''));
    if ([...q].length) url += `?${q}`;
  }
  let r;
  try {
    r = await fetch(url, {method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal,
      cache: 'no-store', credentials: 'omit'});
  } catch (exc) {
    if (exc.name === 'AbortError') throw exc;
    throw new ApiError(0, 'the server cannot be reached');
  }
  let data = null;
  try { data = await r.json(); } catch { /* not JSON: keep the status */ }
  if (!r.ok) {
    const err = new ApiError(r.status, (data && data.error) || `${r.status} ${r.statusText}`, data && data.field);
    if (r.status === 401 && headers.Authorization) {
      session.clear();
      for (const fn of listeners) fn(err.message);
    }
    throw err;
  }
  return data;
}

export async function login(name, password) {
  const out = await api('/auth/login', {method: 'POST', body: {login: name, password}});
  session.set({token: out.token, user: out.user, level: out.level, login: name,
    expires: Date.now() + 1000 * (out.expires_in - 30)});
  const me = await api('/me');
  session.set({...session.get(), usergroup: me.usergroup || null});
  return session.get();
}

export function logout() { session.clear(); }

export function isAdmin(s) { return !!s && s.level === 'SUPER_USER'; }
