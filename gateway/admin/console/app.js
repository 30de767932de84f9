// keygate console: a small page over the admin API (../admin/v1/... from the page), nothing else.
//
// The token lives in `session` below and nowhere else: not in localStorage, sessionStorage,
// a cookie or the URL. Reloading the page signs out. Every value from the API reaches the page
// as text (textContent), never as HTML: key names are written by workspace admins and read by
// the operator.

// The admin API beside the page (the listener's /admin/v1 when the page is its /console/): taken
// from the page's own address, not absolute, so a reverse proxy that mounts the admin listener
// under a path (/kg/console/) gets the calls under that path too. An absolute /admin/v1 sent
// them, and the token in their Authorization header, to whatever else that host has at /admin/.
const API = new URL("../admin/v1", location.href).pathname;
const DAY = 86400 * 1000;

let session = null;  // {token, operator, label, workspace, keys, roles, usage}
// The admin API's clock minus this browser's, ms, from the Date of its latest answer (the
// middle of that second): "30d from now" and "unused for N days" count from the server's
// clock, not from a laptop's that may be days off.
let serverAhead = 0;
const serverNow = () => Date.now() + serverAhead;
let view = {sort: "created_at", descending: true};

const $ = (id) => document.getElementById(id);

// --- the admin API -----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, requestId) {
    super(message);
    this.status = status;
    this.code = code;
    this.requestId = requestId;
  }
}

async function api(method, path, body) {
  if (session === null) throw new ApiError(0, "signed_out", "You are signed out.", null);
  const mine = session;
  const headers = {"Authorization": "Bearer " + mine.token, "Accept": "application/json"};
  const init = {method, headers, cache: "no-store", credentials: "omit", redirect: "error",
                referrerPolicy: "no-referrer"};
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(API + path, init);
  } catch (err) {
    throw new ApiError(0, "network", "The admin API could not be reached (" + err.message + ").",
                       null);
  }
  const served = Date.parse(response.headers.get("Date") || "");
  if (!Number.isNaN(served)) serverAhead = served + 500 - Date.now();
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    data = null;
  }
  // An answer to an earlier sign-in (signed out, or in again as someone else, meanwhile) is not
  // this page's any more: nothing waits on it, nothing of it is shown. Except a new token: its
  // key exists now (or an old one was revoked for it), and this answer is its only copy.
  if (session !== mine && !(response.ok && data && typeof data.token === "string")) {
    return new Promise(() => {});
  }
  if (!response.ok) {
    const error = data && data.error ? data.error : {};
    const failure = new ApiError(response.status, error.code || "http_" + response.status,
                                 (error.message || "The admin API answered " + response.status +
                                  ".") + retryAfter(response),
                                 error.request_id || response.headers.get("X-Request-Id"));
    if (response.status === 401 && mine.signedIn) {
      // the token stopped working mid-session (key revoked or expired, operator token changed):
      // back to sign-in with the API's reason, the token and the workspace's data forgotten
      const signedOut = new ApiError(401, failure.code, "Signed out: " + failure.message,
                                     failure.requestId);
      signOut();
      showAlert(describe(signedOut));
      throw signedOut;
    }
    if (response.status === 403 && mine.signedIn && !mine.operator && path !== "/workspaces" &&
        await lostAdmin(mine)) {
      // the key no longer holds keys:admin (re-bound meanwhile): every call is refused now, and
      // the workspace's keys on screen are no longer this person's to see
      const signedOut = new ApiError(403, failure.code, "Signed out: " + failure.message,
                                     failure.requestId);
      signOut();
      showAlert(describe(signedOut));
      throw signedOut;
    }
    throw failure;
  }
  return data;
}

// " Try again in N seconds." from a refusal's Retry-After (a 429 says "wait before trying
// again", a 503 "overloaded" to come back shortly: the header says how long), else "".
function retryAfter(response) {
  const value = (response.headers.get("Retry-After") || "").trim();
  if (!/^\d{1,9}$/.test(value)) return "";
  const seconds = Math.max(Number(value), 1);
  return seconds < 120 ? " Try again in " + plural(seconds, "second") + "."
    : " Try again in " + plural(Math.ceil(seconds / 60), "minute") + ".";
}

// Whether a workspace admin's key has lost its access (a 403 may also mean only "not this
// step", such as granting a scope the key lacks): the call the page signs in with answers it.
async function lostAdmin(mine) {
  try {
    const check = await fetch(API + "/workspaces", {
      method: "GET",
      headers: {"Authorization": "Bearer " + mine.token, "Accept": "application/json"},
      cache: "no-store", credentials: "omit", redirect: "error", referrerPolicy: "no-referrer"});
    return session === mine && (check.status === 401 || check.status === 403);
  } catch (err) {
    return false;  // unreachable: not a sign that access is gone
  }
}

function describe(err) {
  if (err instanceof ApiError) {
    return err.requestId ? err.message + " (request id " + err.requestId + ")" : err.message;
  }
  return "Something went wrong in the page: " + err.message;
}

// --- small DOM helpers -------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "text") node.textContent = value;
    else if (name === "on") for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showAlert(message) {
  const box = $("alert");
  box.textContent = message;
  box.hidden = !message;
}

function announce(message) {
  $("status").textContent = message;
}

function showFormError(form, message) {
  const box = form.querySelector(".form-error");
  box.textContent = message || "";
  box.hidden = !message;
}

function when(iso) {
  if (!iso) return "";
  return iso.replace("T", " ").replace(/:\d\d(\.\d+)?Z$/, " UTC");
}

function plural(n, word) {
  return n.toLocaleString("en") + " " + word + (n === 1 ? "" : "s");
}

// "30d" / "12h" / "90m" / "3600s" → seconds; a date or date-time → epoch ms; "" → null.
function parseExpiry(text) {
  const value = text.trim();
  if (value === "" || value.toLowerCase() === "never") return {never: true};
  const duration = /^(\d{1,6})\s*([smhdw])$/i.exec(value);
  if (duration) {
    const unit = {s: 1, m: 60, h: 3600, d: 86400, w: 604800}[duration[2].toLowerCase()];
    return {seconds: Number(duration[1]) * unit};
  }
  // A date, or a date and time, in UTC as the form says (Date.parse would read "2027-01-31 12:00"
  // in the browser's own time zone, and move "2027-02-31" to March 3); an explicit zone is kept.
  const DATE_TIME = /^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2}))?)?/;
  const found = new RegExp(DATE_TIME.source + /\s*(Z|UTC|[+-]\d{2}:?\d{2})?$/.source, "i")
    .exec(value);
  const problem = new Error("Expires must be empty (never), a duration such as 30d, 12h or 90m, " +
                            "or a date such as 2027-01-31 (UTC).");
  if (!found) throw problem;
  const [year, month, day, hour, minute, second] = found.slice(1, 7).map((n) => Number(n || 0));
  const local = Date.UTC(year, month - 1, day, hour, minute, second);
  const check = new Date(local);
  if (check.getUTCFullYear() !== year || check.getUTCMonth() !== month - 1 ||
      check.getUTCDate() !== day || hour > 23 || minute > 59 || second > 59) {
    throw problem;
  }
  const zone = (found[7] || "Z").toUpperCase();
  let offset = 0;  // minutes east of UTC
  if (zone !== "Z" && zone !== "UTC") {
    const digits = zone.replace(":", "");
    const minutes = Number(digits.slice(1, 3)) * 60 + Number(digits.slice(3));
    offset = zone[0] === "-" ? -minutes : minutes;
  }
  return {at: new Date(local - offset * 60000).toISOString().replace(/\.\d{3}Z$/, "Z")};
}

// Grace: "30m" / "24h" / "7d" / "2w" / "3600s" → seconds; "0" (or empty) alone is none. A unit
// is required otherwise, as the CLI's parse_duration has it: a bare 24 could mean seconds or
// hours (read as seconds, the old key, still deployed, stopped working 24 seconds later).
function parseDuration(text) {
  const value = text.trim();
  if (value === "" || value === "0") return 0;
  const found = /^(\d{1,9})\s*([smhdw])$/i.exec(value);
  if (found) {
    const unit = {s: 1, m: 60, h: 3600, d: 86400, w: 604800}[found[2].toLowerCase()];
    return Number(found[1]) * unit;
  }
  if (/^\d{1,9}$/.test(value)) {
    throw new Error("Grace needs a unit: a bare " + value + " could mean seconds, hours or " +
                    "days. Give 0, or a duration such as 30m, 24h or 7d.");
  }
  throw new Error("Grace must be 0 or a duration such as 30m, 24h or 7d.");
}

function splitScopes(text) {
  return text.split(/[\s,]+/).filter((s) => s !== "");
}

// --- dialogs: built when opened, removed when closed (one at a time) ----------------------------

// Dialogs waiting for a shown-once token's Done: a dialog holding a token is never closed or
// covered by another (two calls in flight, such as a Create and a Rotate, each answer a token:
// the second answer's dialog replaced the first's, and that live key's token was never seen).
const waitingDialogs = [];

let dialogsOpened = 0;

const tokenOnScreen = () => document.querySelector("dialog [data-token]") !== null;

// Where keyboard focus goes when a dialog closes and no dialog is left: the control on the page
// it was opened from (`element`, and the key row it sat in: the table may have been redrawn).
// A dialog opened from inside another dialog (a token over a Rotate dialog whose call was on its
// way, or a token queued behind another's Done) goes back to where that dialog came from: its
// own opener is gone with it, and the body is no place to leave a keyboard user.
function returnPointOf(opener) {
  const host = opener && opener.closest ? opener.closest("dialog") : null;
  if (host && host.returnPoint) return host.returnPoint;
  const row = opener && opener.closest ? opener.closest("#keys tbody tr") : null;
  return {element: opener === document.body ? null : opener, row};
}

function focusBack(point) {
  if (session === null) {  // signed out meanwhile: back to sign-in
    $("token").focus();
    return;
  }
  const {element, row} = point;
  if (element && element.isConnected) element.focus();
  else if (row && element) focusAgain(row.dataset.keyId, element.textContent);
  else if (!$("workspace-view").hidden) $("ws-title").focus();
  else if (!$("workspaces-view").hidden) $("workspaces-title").focus();
}

// `modal`: Escape does not close it (the shown-once token stays until Done is pressed: a reflex
// on Escape must not lose a token that can never be shown again). A dialog holding a token
// opens over a dialog whose call is still on its way (its answer or its problem still shows
// there), and while a token is on screen any other dialog waits for its Done (with where focus
// goes back to after it, taken now: when it opens, the Done pressed has gone and focus with it).
function openDialog(title, build, {modal = false, returnPoint = undefined} = {}) {
  if (tokenOnScreen()) {
    waitingDialogs.push([title, build,
                         {modal, returnPoint: returnPointOf(document.activeElement)}]);
    return;
  }
  const titleId = "dialog-title-" + (++dialogsOpened);  // two may be open, one over the other
  const heading = el("h2", {id: titleId, text: title});
  const dialog = el("dialog", {"role": "dialog", "aria-modal": "true",
                               "aria-labelledby": titleId}, heading);
  const opener = document.activeElement;
  dialog.returnPoint = returnPoint || returnPointOf(opener);
  let closing = false;
  const close = () => {
    closing = true;
    // a selection in the dialog (Copy's fallback selects the token) goes with it: left behind,
    // it held the caret when the dialog gave focus back to the Token field, and typing there
    // then went nowhere
    const selection = window.getSelection();
    if (selection.rangeCount > 0 && dialog.contains(selection.anchorNode)) {
      selection.removeAllRanges();
    }
    dialog.close();
    dialog.remove();
    if (!tokenOnScreen() && waitingDialogs.length > 0) {
      openDialog(...waitingDialogs.shift());  // the next token (it takes focus)
      return;
    }
    const left = document.querySelector("dialog[open]");
    if (left) {  // a dialog under this one: focus back to where it was in it, if it was
      if (opener && opener.isConnected && left.contains(opener)) opener.focus();
      return;
    }
    focusBack(dialog.returnPoint);
  };
  build(dialog, close);
  closeDialogs({keepBusy: dialog.querySelector("[data-token]") !== null});
  // Escape closes neither a modal one nor one whose call is on its way (aria-busy, set by
  // oneAtATime): the call goes on whatever the dialog does, and its answer, an error above all,
  // was written into a dialog no longer on the page, where nobody saw it
  const held = () => modal || dialog.getAttribute("aria-busy") === "true";
  dialog.addEventListener("cancel", (event) => {
    event.preventDefault();
    if (!held()) close();
  });
  // the browser may close a dialog whatever "cancel" says (a second Escape in a row): open it again
  dialog.addEventListener("close", () => {
    if (held() && !closing && dialog.isConnected) dialog.showModal();
  });
  document.body.append(dialog);
  dialog.showModal();
  const first = dialog.querySelector("[autofocus]") || dialog.querySelector("input, select, button");
  if (first) first.focus();
  return dialog;
}

// `keepTokens`: a dialog showing a token just made stays (on a sign-out, it is the only copy
// of a live key's token: rotating the key one is signed in with signs out the page, and the new
// token is then the only way back in). Done removes it. `keepBusy`: a dialog whose call is on
// its way stays too (a token dialog opens over it). Without either, the waiting ones go too.
function closeDialogs({keepTokens = false, keepBusy = false} = {}) {
  if (!keepTokens && !keepBusy) waitingDialogs.length = 0;
  for (const dialog of document.querySelectorAll("dialog")) {
    if ((keepTokens || keepBusy) && dialog.querySelector("[data-token]")) continue;
    if (keepBusy && dialog.getAttribute("aria-busy") === "true") continue;
    dialog.close();
    dialog.remove();
  }
}

// `act` as an event handler that runs once at a time: while its API call is on its way, a second
// click or Enter on the same form or dialog does nothing (a double click on Create made two keys,
// on Rotate two new keys, and the second token dialog replaced the first: a live key whose token
// nobody ever saw). Nothing is disabled, so focus stays where the person left it.
//
// A call that takes its time shows that it is on its way (aria-busy alone draws nothing, and a
// press that did nothing looked the same as a slow answer): after a moment the pressed button
// is aria-disabled and a status line under it says `busyLabel` ("Signing in…") and that the page
// waits for the admin API; after 10 s, that it is still waiting. The answer puts both back. The
// button keeps its name: people and tests find the controls by the names they always have.
const SHOW_WAITING_MS = 300;  // a quick answer changes nothing on screen
const STILL_WAITING_MS = 10000;

function oneAtATime(container, act, busyLabel) {
  let running = false;
  return async (event) => {
    // the button pressed: a form's submitter (Enter in a field too), or the button clicked
    const button = event && event.submitter ? event.submitter
      : event && event.currentTarget instanceof HTMLButtonElement ? event.currentTarget
      : container.querySelector("button[type=submit]");
    if (event) event.preventDefault();
    if (running) return;
    running = true;
    container.setAttribute("aria-busy", "true");
    const line = el("p", {"class": "waiting", "role": "status"});
    container.append(line);
    const waiting = setTimeout(() => {
      if (button) button.setAttribute("aria-disabled", "true");
      line.textContent = busyLabel + " Waiting for the admin API to answer.";
    }, SHOW_WAITING_MS);
    const still = setTimeout(() => {
      line.textContent = "Still waiting for the admin API after " + STILL_WAITING_MS / 1000 +
        " seconds: it is slow, or cannot be reached. Its answer, or the error, shows here " +
        "when it comes; pressing again sends nothing more.";
    }, STILL_WAITING_MS);
    try {
      await act(event);
    } finally {
      clearTimeout(waiting);
      clearTimeout(still);
      running = false;
      container.removeAttribute("aria-busy");
      line.remove();
      if (button) button.removeAttribute("aria-disabled");
    }
  };
}

// The same for a call made from no form or dialog (a workspace's link, All workspaces, a row's
// Disable or Enable): after a moment the page's status line says `text`, after 10 s that it is
// still waiting. The function returned ends it (the line is cleared if it still says so).
function waitingLine(text) {
  let shown = null;
  const say = (message) => {
    announce(message);
    shown = message;
  };
  const waiting = setTimeout(() => say(text), SHOW_WAITING_MS);
  const still = setTimeout(() => {
    if ($("status").textContent === shown) {  // not when a later step has said something
      say("Still waiting for the admin API after " + STILL_WAITING_MS / 1000 + " seconds: " +
          "it is slow, or cannot be reached.");
    }
  }, STILL_WAITING_MS);
  return () => {
    clearTimeout(waiting);
    clearTimeout(still);
    if (shown !== null && $("status").textContent === shown) announce("");
  };
}

function errorBox() {
  return el("p", {"class": "form-error", "role": "alert", "hidden": true});
}

function showProblem(box, message) {  // in a dialog's errorBox()
  box.textContent = message;
  box.hidden = false;
}

// The life, in ms, a rotation gives the key replacing `key`, or null for none: as the API counts
// it (gateway/store/admin_keys.py rotate_key), the old key's lifetime (its expiry less its
// creation, both shown to the second, at least a second) from the moment of the rotation -- not
// the old key's expiry, which is past for an expired key and nearer than that for a key in use.
// A workspace key's rotation then cuts it at the acting key's own expiry (Self-service rules).
// (A key in a rotation's grace shows the grace's end, not its own expiry, which the API never
// shows: its lifetime is then counted short here.)
function rotationLife(key) {
  if (!key.expires_at) return null;
  return Math.max(1000, Date.parse(key.expires_at) - Date.parse(key.created_at));
}

// "30 days", "about 2 days", "12 hours": a lifetime (ms) in its largest whole-ish unit.
function span(ms) {
  const seconds = ms / 1000;
  for (const [unit, size] of [["day", 86400], ["hour", 3600], ["minute", 60]]) {
    if (seconds >= size) {
      const n = seconds / size;
      return Number.isInteger(n) ? plural(n, unit) : "about " + plural(Math.round(n), unit);
    }
  }
  return plural(Math.round(seconds), "second");
}

// What a rotation of `key` gives its successor, said after "not ...": the date its lifetime runs
// to from `from` (ms), or no expiry.
function uncutLife(key, from) {
  const life = rotationLife(key);
  return life === null
    ? "no expiry (" + key.name + " never expires)"
    : when(new Date(from + life).toISOString()) + " (" + key.name + "'s lifetime of " +
      span(life) + ", counted from the rotation)";
}

// `replaced`: the key a rotation replaced. The new key expiring before the replaced key's
// lifetime from its creation (or at all, when the replaced key never expires) was cut by the
// workspace key that rotated it: a key it makes cannot outlive it.
function showTokenDialog(title, token, key, replaced) {
  const life = replaced === undefined ? undefined : rotationLife(replaced);
  const cut = life !== undefined && Boolean(key.expires_at) &&
    (life === null || Date.parse(key.expires_at) < Date.parse(key.created_at) + life);
  openDialog(title, (dialog, close) => {
    const status = el("span", {"class": "copied", "aria-live": "polite"});
    const tokenBox = el("code", {"class": "token", "data-token": token, "tabindex": "0",
                                 "text": token});
    const copy = async () => {
      try {
        await navigator.clipboard.writeText(token);
      } catch (err) {  // no clipboard permission: select the text so Ctrl+C copies it
        const range = document.createRange();
        range.selectNodeContents(tokenBox);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        status.textContent = "Selected: press Ctrl+C to copy.";
        return;
      }
      status.textContent = "Copied.";
    };
    dialog.append(
      el("p", {"class": "warning", "text": "Copy this token now. It cannot be shown again: " +
                                           "keygate keeps only a hash of it."}),
      el("p", {"class": "meta", "text": "Key " + key.name + " (" + key.prefix + ")"}),
      cut ? el("p", {"class": "warning", "text": "This key expires " + when(key.expires_at) +
                     ", when the workspace key that rotated it expires (a key it makes " +
                     "cannot outlive it), not " + uncutLife(replaced, Date.parse(key.created_at)) +
                     ": the integration needs a new token by then."}) : "",
      tokenBox,
      el("div", {"class": "actions"},
         el("button", {"type": "button", "class": "primary", "autofocus": true, "text": "Copy",
                       "on": {click: copy}}),
         el("button", {"type": "button", "text": "Done", "on": {click: close}}),
         status));
  }, {modal: true});
}

// --- signing in and out ------------------------------------------------------------------------

// Exactly the shape the admin API may take as a key (gateway/admin/middleware.py _TOKEN_SHAPE);
// anything else it checks as the operator token only, and so must the page (a looser shape here
// signed an operator token such as "Keygate-Ops_admin_<50>" in as a key of the first workspace).
// A token of this shape may still be the operator token (one chosen in a key's shape): which one
// it is, the API's answers say (actingAs), not the shape.
function looksLikeKey(token) {
  return /^[a-z0-9]{1,10}_[A-Za-z0-9]{1,32}_[A-Za-z0-9]{50}$/.test(token);
}

// Whether the token that listed `listing` (GET /workspaces) is a workspace key, as the API
// answers: a key lists its own workspace alone, and reads itself there (its id is in its
// token, its prefix is the token's start). Anything else is the operator token: the shape
// alone signed an operator token shaped like a key in as "key ops_admin_…", with one workspace
// and no way to the others.
async function actingAs(token, listing) {
  if (!looksLikeKey(token) || listing.items.length !== 1) return {operator: true, keyId: null};
  const keyId = token.slice(token.length - 50, token.length - 38);
  let own;
  try {
    own = await api("GET", "/workspaces/" + encodeURIComponent(listing.items[0].id) + "/keys/" +
                           encodeURIComponent(keyId));
  } catch (err) {
    if (err.status === 404) return {operator: true, keyId: null};  // the operator's: no such key
    throw err;
  }
  const isKey = own !== null && own.id === keyId && typeof own.prefix === "string" &&
                token.startsWith(own.prefix);
  return isKey ? {operator: false, keyId} : {operator: true, keyId: null};
}

// A character no token holds: anything but printable ASCII, as the CLI's client refuses it
// (typographic quotes or guillemets, an ellipsis from a cut-short display, a zero-width space,
// a soft hyphen left by a copy from wrapped text, a control). Named as "U+201C (character 1)".
// Only what a header cannot carry (beyond Latin-1) was refused: a soft hyphen or a guillemet
// was sent, and the answer was "The operator token is not valid." (a wrong guess counted).
function unsendable(token) {
  const chars = [...token];
  const at = chars.findIndex((c) => c.codePointAt(0) < 0x20 || c.codePointAt(0) > 0x7e);
  if (at < 0) return null;
  const code = chars[at].codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
  return "U+" + code + " (character " + (at + 1) + ")";
}

async function signIn(event) {
  event.preventDefault();
  const input = $("token");
  const token = input.value.trim();
  input.value = "";
  showAlert("");
  if (token === "") {
    showAlert("Enter the operator token or a key holding keys:admin.");
    input.focus();
    return;
  }
  const odd = unsendable(token);
  if (odd !== null) {  // else fetch refuses the header and the page blamed the network
    showAlert("The token holds " + odd + ", which no token has: paste it again, without " +
              "quotes, spaces or an ellipsis around or in it.");
    input.focus();
    return;
  }
  // who the token is (operator or key) is known once the API has answered
  session = {token, operator: null, keyId: null, workspace: null, keys: [], roles: [],
             usage: null, label: ""};
  const mine = session;
  let listing, acting;
  try {
    listing = await api("GET", "/workspaces");
    acting = await actingAs(token, listing);
  } catch (err) {
    if (session === mine) session = null;
    showAlert(describe(err));
    input.focus();
    return;
  }
  session.operator = acting.operator;
  session.keyId = acting.keyId;
  session.label = acting.operator ? "operator" : "key " + token.slice(0, token.length - 38);
  session.signedIn = true;
  $("signin-view").hidden = true;
  $("sign-out").hidden = false;
  $("who").textContent = "Signed in as " + session.label;
  if (session.operator) {
    showWorkspaces(listing.items);
  } else {
    const opening = session;
    if (!(await openWorkspace(listing.items[0].id)) && session === opening) {
      // a workspace admin has no view but its workspace: one that cannot be read (a store
      // blip, a proxy's timeout) is a failed sign-in, with the reason, and Sign in tries again
      const reason = $("alert").textContent;
      signOut();
      showAlert(reason);
    }
  }
}

function signOut() {
  session = null;
  closeDialogs({keepTokens: true});
  for (const id of ["workspaces-view", "workspace-view", "sign-out"]) $(id).hidden = true;
  for (const id of ["who", "ws-title", "ws-plan", "usage-text", "keys-text"]) {
    $(id).textContent = "";
  }
  announce("");
  // the next person at this screen starts from the whole list, not from this one's view of it
  $("filter-status").value = "";
  $("filter-unused").value = "";
  $("sort").value = "created_at:desc";
  view = {sort: "created_at", descending: true};
  $("keys").tBodies[0].replaceChildren();
  $("workspaces").tBodies[0].replaceChildren();
  resetCreateForm();
  showAlert("");
  $("signin-view").hidden = false;
  $("token").focus();
}

// --- operator: the workspace list --------------------------------------------------------------

function showWorkspaces(items) {
  $("workspace-view").hidden = true;
  $("workspaces-view").hidden = false;
  const body = $("workspaces").tBodies[0];
  body.replaceChildren(...items.map((ws) => el("tr", {"data-workspace": ws.id},
    el("th", {"scope": "row"}, el("a", {"href": "#workspace-" + ws.id, "text": ws.id,
      "on": {click: (event) => { event.preventDefault(); openWorkspace(ws.id); }}})),
    el("td", {"text": ws.name}),
    el("td", {"text": ws.plan}),
    el("td", {"text": when(ws.created_at)}))));
  $("workspaces-empty").hidden = items.length > 0;
  // the control that led here (Sign in, All workspaces) is hidden now: focus to the list's
  // heading, so a screen reader says where it is and Tab goes on to the first workspace
  $("workspaces-title").focus();
}

async function backToWorkspaces(event) {
  event.preventDefault();
  showAlert("");
  const mine = ++chosen;
  const done = waitingLine("Reading the workspaces…");
  try {
    const listing = await api("GET", "/workspaces");
    if (mine === chosen) showWorkspaces(listing.items);
  } catch (err) {
    if (mine === chosen) showAlert(describe(err));
  } finally {
    done();
  }
}

// --- one workspace: usage, cap, keys -----------------------------------------------------------

// Which view the person chose last (a workspace, or the list): an answer for an earlier choice
// that arrives after a later one is dropped, else a slow workspace's keys were drawn under the
// title of the one opened after it (Revoke on them a 404, Create key making a key elsewhere).
let chosen = 0;

// Whether the workspace is now shown (false: the alert says why, or a later choice won).
async function openWorkspace(id) {
  showAlert("");
  announce("");
  const mine = ++chosen;
  let workspace, roles, listed;
  const done = waitingLine("Opening workspace " + id + "…");
  try {
    const ws = encodeURIComponent(id);
    [workspace, roles, listed] = await Promise.all([
      api("GET", "/workspaces/" + ws), api("GET", "/workspaces/" + ws + "/roles"),
      readKeys(id)]);
  } catch (err) {
    if (mine === chosen) showAlert(describe(err));
    return false;
  } finally {
    done();
  }
  if (mine !== chosen) return false;
  session.workspace = workspace;
  session.roles = roles.items;
  session.keys = listed.keys;
  session.usage = listed.usage;
  renderUsage();
  renderKeys();
  $("ws-title").textContent = workspace.name + " (" + workspace.id + ")";
  $("back-nav").hidden = !session.operator;
  resetCreateForm();
  $("workspaces-view").hidden = true;
  $("workspace-view").hidden = false;
  $("ws-title").focus();
  return true;
}

// A workspace's keys (every page) and its usage.
async function readKeys(id) {
  const ws = "/workspaces/" + encodeURIComponent(id);
  const [keys, usage] = await Promise.all([api("GET", ws + "/keys"), api("GET", ws + "/usage")]);
  let page = keys;
  while (page.next_cursor) {  // a paged listing: read every page (counts need them all)
    page = await api("GET", ws + "/keys?cursor=" + encodeURIComponent(page.next_cursor));
    keys.items.push(...page.items);
  }
  return {keys: keys.items, usage};
}

// The open workspace's list read again (after an action): drawn only if that workspace is still
// the one chosen when the answer arrives, and no later reading has been asked for meanwhile
// (two steps in a row each read the list: when the first reading answered last, it was drawn
// over the second, and a key revoked by the second step showed as active again).
let readings = 0;

async function refresh() {
  const mine = chosen;
  const reading = ++readings;
  const listed = await readKeys(session.workspace.id);
  if (mine !== chosen || reading !== readings) return;
  session.keys = listed.keys;
  session.usage = listed.usage;
  renderUsage();
  renderKeys();
}

function renderUsage() {
  const usage = session.usage;
  const bar = $("usage-bar");
  if (usage.limit === null || usage.limit === undefined) {
    $("usage-text").textContent = plural(usage.used, "request") + " in " + usage.period +
                                  " (no monthly limit)";
    bar.hidden = true;
  } else {
    $("usage-text").textContent = usage.used.toLocaleString("en") + " of " +
      plural(usage.limit, "request") + " in " + usage.period + "; " +
      usage.remaining.toLocaleString("en") + " left until " + when(usage.resets_at);
    bar.hidden = false;
    bar.max = Math.max(usage.limit, 1);
    bar.value = Math.min(usage.used, usage.limit);
  }
  const active = session.keys.filter((k) => k.status === "active").length;
  const limits = usage.limits || session.workspace.limits || {};
  $("ws-plan").textContent = session.workspace.plan +
    (limits.rate_limit ? " (rate limit " + limits.rate_limit + " per key)" : "");
  const cap = limits.max_keys;
  const keysBar = $("keys-bar");
  if (cap === null || cap === undefined) {
    $("keys-text").textContent = active + " active (no cap)";
    keysBar.hidden = true;
  } else {
    $("keys-text").textContent = active + " of " + cap + " active keys allowed";
    keysBar.hidden = false;
    keysBar.max = Math.max(cap, 1);
    keysBar.value = Math.min(active, cap);
  }
}

function visibleKeys() {
  const status = $("filter-status").value;
  const unusedText = $("filter-unused").value.trim();
  const unusedDays = unusedText === "" ? null : Number(unusedText);
  const now = serverNow();
  let keys = session.keys.filter((k) => status === "" || k.status === status);
  if (unusedDays !== null && Number.isFinite(unusedDays) && unusedDays >= 0) {
    keys = keys.filter((k) => k.last_used_at === null ||
                              now - Date.parse(k.last_used_at) > unusedDays * DAY);
  }
  const field = view.sort;
  const order = view.descending ? -1 : 1;
  return keys.slice().sort((a, b) => {
    const x = a[field], y = b[field];
    if (x === y) return a.name.localeCompare(b.name);
    // never used is the least recent use of all (as the API's sort=last_used has it): first
    // from the least recently used on, last from the most recently used on
    if (field === "last_used_at" && (x === null || y === null)) {
      return (x === null ? -1 : 1) * order;
    }
    if (x === null) return 1;   // never expires: last, whichever the direction
    if (y === null) return -1;
    return (field === "name" ? x.localeCompare(y) : x < y ? -1 : 1) * order;
  });
}

// Keyboard focus on a control of the key table, after the table was redrawn (its buttons are
// new elements): the same key's button with the same text, else the workspace's title; never
// lost to the top of the page.
function focusAgain(keyId, text) {
  const row = [...$("keys").tBodies[0].rows].find((r) => r.dataset.keyId === keyId);
  const again = row ? [...row.querySelectorAll("button")]
    .find((b) => b.textContent === text && !b.disabled) : undefined;
  if (again) again.focus();
  else if (!$("workspace-view").hidden) $("ws-title").focus();
}

function renderKeys() {
  const focused = document.activeElement;
  const focusedRow = focused && focused.closest ? focused.closest("#keys tbody tr") : null;
  const keys = visibleKeys();
  $("month-col").hidden = !session.keys.some(hasControls);
  for (const th of $("keys").tHead.rows[0].cells) {
    if (!th.dataset.sort) continue;
    th.setAttribute("aria-sort", th.dataset.sort !== view.sort ? "none"
                    : view.descending ? "descending" : "ascending");
  }
  $("keys").tBodies[0].replaceChildren(...keys.map(keyRow));
  if (focusedRow && !focused.isConnected) focusAgain(focusedRow.dataset.keyId, focused.textContent);
  $("keys-empty").textContent = session.keys.length === 0
    ? "No keys yet: Create key makes the first one." : "No keys match these filters.";
  $("keys-empty").hidden = keys.length > 0;
}

// Key controls (per-key monthly cap, enable/disable, delete) appear when the API's key objects
// carry them (their fields are present), so the page works with the API it is served with.
function hasControls(key) {
  return "enabled" in key && "used_this_month" in key;
}

function monthText(key) {
  const used = key.used_this_month.toLocaleString("en");
  return key.monthly_requests === null ? used : used + " of " +
    key.monthly_requests.toLocaleString("en");
}

function keyRow(key) {
  const nameId = "key-name-" + key.id;
  const revoked = key.status === "revoked";
  const controls = hasControls(key);
  const button = (text, handler, disabled) => el("button", {
    "type": "button", "text": text, "aria-describedby": nameId, "disabled": disabled,
    "on": {click: () => handler(key)}});
  const binding = key.role !== null
    ? el("span", {}, el("span", {"class": "role", "text": key.role}), " ",
         el("span", {"class": "hint", "text": key.scopes.join(" ")}))
    : el("span", {"text": key.scopes.join(" ")});
  return el("tr", {"data-key-id": key.id, "class": "status-" + key.status},
    el("th", {"scope": "row", "id": nameId, "text": key.name}),
    el("td", {"class": "description", "text": key.description}),
    el("td", {}, binding),
    el("td", {}, el("code", {"text": key.prefix})),
    el("td", {"class": "when", "text": when(key.created_at)}),
    el("td", {"class": "when", "text": key.last_used_at ? when(key.last_used_at) : "never"}),
    el("td", {"class": "when", "text": key.expires_at ? when(key.expires_at) : "never"}),
    controls ? el("td", {"class": "month", "text": monthText(key)}) : "",
    el("td", {}, el("span", {"class": "badge " + key.status, "text": key.status}),
       controls && key.enabled === false && !revoked
         ? el("span", {"class": "badge disabled", "text": "disabled"}) : ""),
    el("td", {"class": "row-actions"},
       button("Edit", editKey, revoked),
       controls ? button(key.enabled === false ? "Enable" : "Disable", toggleKey, revoked) : "",
       button("Rotate", rotateKey, revoked),
       button("Revoke", revokeKey, revoked),
       controls && key.status !== "active" ? button("Delete", deleteKey, false) : ""));
}

function sortBy() {
  const [field, direction] = $("sort").value.split(":");
  view = {sort: field, descending: direction === "desc"};
  renderKeys();
}

// A column header's button sorts by its column first as the menu's first entry for it does
// (newest, A to Z, most recently used, soonest to expire, active first), and reverses the
// order when pressed again; the menu shows the same order (it has an entry for each).
const FIRST_DESCENDING = new Set(["created_at", "last_used_at"]);

function sortByColumn(field) {
  view = view.sort === field ? {sort: field, descending: !view.descending}
                             : {sort: field, descending: FIRST_DESCENDING.has(field)};
  $("sort").value = field + ":" + (view.descending ? "desc" : "asc");
  renderKeys();
}

function keyPath(key) {
  return "/workspaces/" + encodeURIComponent(session.workspace.id) + "/keys/" +
         encodeURIComponent(key.id);
}

// --- create ------------------------------------------------------------------------------------

function fillRoles(select, current) {
  const options = [el("option", {"value": "", "text": "(none: use scopes)"})];
  for (const role of session.roles) {
    options.push(el("option", {"value": role.name, "text": role.name,
                               "selected": role.name === current}));
  }
  // A key's role the page did not list (defined after the page read the roles, or no longer
  // defined) is still its role: without an option for it the field read "(none: use scopes)",
  // and saving any other change re-bound the key to no scopes.
  if (current && !session.roles.some((role) => role.name === current)) {
    options.push(el("option", {"value": current, "text": current, "selected": true}));
  }
  select.replaceChildren(...options);
  select.value = current || "";
}

// The form is cloned from a <template> when opened and removed when closed, so its fields are
// on the page only while it is open: no label ever appears twice (the edit dialog has its own).
function resetCreateForm() {
  const form = $("create-form");
  const wasOpen = form !== null;
  if (wasOpen) form.remove();
  $("create-open").hidden = false;
  if (wasOpen && !$("workspace-view").hidden) $("create-open").focus();
}

function openCreateForm() {
  if ($("create-form") !== null) return;
  const form = $("create-template").content.firstElementChild.cloneNode(true);
  $("create-slot").append(form);
  fillRoles($("create-role"), "");
  // A workspace key that expires bounds every key it makes: the API gives a key created with
  // no expiry the acting key's own, so "Empty for never" would not be what happens.
  const own = session.operator ? undefined : session.keys.find((k) => k.id === session.keyId);
  if (own && own.expires_at) {
    const until = when(own.expires_at);
    $("create-expires").placeholder = until;
    $("expires-hint").textContent = "Empty for " + until + ", when the key you are signed in " +
      "with expires (a key it makes cannot outlive it); a duration such as 30d, 12h or 90m; " +
      "or an earlier date such as 2027-01-31 (UTC).";
  }
  form.addEventListener("submit", oneAtATime(form, createKey, "Creating…"));
  $("create-cancel").addEventListener("click", resetCreateForm);
  $("create-open").hidden = true;
  $("create-name").focus();
}

async function createKey(event) {
  event.preventDefault();
  const form = $("create-form");
  showFormError(form, "");
  const body = {name: $("create-name").value.trim()};
  // one line, as the API takes text (a control character is a 400): a tab or line break
  // pasted in is sent as a space (the field was a <textarea>, whose newlines were all refused)
  const description = $("create-description").value
    .replace(/[\u0000-\u001f\u007f-\u009f]+/g, " ");
  if (description.trim() !== "") body.description = description;
  const role = $("create-role").value;
  const scopes = splitScopes($("create-scopes").value);
  if (role === "" && scopes.length === 0) {
    // nothing sent: with neither, the API made a live key bound to no scope at all (it could
    // call nothing, took one of the plan's key slots, and its token was shown)
    // focus stays where it is (the error is an alert): moved to Scopes, the rest of what was
    // being typed where Enter was pressed went into Scopes
    showFormError(form, "Choose a Role or give Scopes: a key is bound to a role or to scopes.");
    $("create-scopes").setAttribute("aria-invalid", "true");
    return;
  }
  $("create-scopes").removeAttribute("aria-invalid");
  if (role !== "") body.role = role;
  if (scopes.length > 0) body.scopes = scopes;  // both: the API says why not
  try {
    const expiry = parseExpiry($("create-expires").value);
    if (expiry.seconds !== undefined) body.expires_in = expiry.seconds;
    if (expiry.at !== undefined) body.expires_at = expiry.at;
  } catch (err) {
    showFormError(form, err.message);
    return;
  }
  const mine = session;
  let created;
  try {
    created = await api("POST", "/workspaces/" + encodeURIComponent(session.workspace.id) +
                                "/keys", body);
  } catch (err) {
    showFormError(form, describe(err));
    return;
  }
  if (session !== mine) {  // signed out meanwhile: the token still goes to the person
    showTokenDialog("Key created", created.token, created.key);
    return;
  }
  resetCreateForm();
  announce("Key " + created.key.name + " created.");
  showTokenDialog("Key created", created.token, created.key);
  created = null;
  await refreshQuietly();
}

async function refreshQuietly() {
  try {
    await refresh();
  } catch (err) {
    showAlert(describe(err));
  }
}

// --- revoke, rotate, edit ----------------------------------------------------------------------

// A dialog that asks before a step that cannot be undone: `act` runs on the danger button; a
// failure shows in the dialog, a success closes it, says `done` and refreshes the list.
const BUSY_LABELS = {Revoke: "Revoking…", Disable: "Disabling…", Delete: "Deleting…"};

function confirmDialog(title, label, act, done, ...text) {
  openDialog(title, (dialog, close) => {
    const problem = errorBox();
    const confirm = oneAtATime(dialog, async () => {
      try {
        await act();
      } catch (err) {
        showProblem(problem, describe(err));
        return;
      }
      close();
      announce(done);
      await refreshQuietly();
    }, BUSY_LABELS[label] || label + "…");
    dialog.append(
      ...text,
      problem,
      el("div", {"class": "actions"},
         el("button", {"type": "button", "class": "danger", "text": label,
                       "on": {click: confirm}}),
         el("button", {"type": "button", "autofocus": true, "text": "Cancel",
                       "on": {click: close}})));
  });
}

function revokeKey(key) {
  const own = key.id === session.keyId;
  confirmDialog(
    "Revoke key " + key.name + "?", "Revoke",
    () => api("POST", keyPath(key) + "/revoke", {}), "Key " + key.name + " revoked.",
    el("p", {"text": "Requests with " + key.prefix + "… are refused from the next one on. " +
                     "Revoking is permanent: a revoked key cannot be restored."}),
    own ? el("p", {"class": "warning", "text": "This is the key you are signed in with: " +
                                               "this page loses access too."}) : "");
}

function rotateKey(key) {
  const own = key.id === session.keyId;
  // A workspace key that expires bounds the key a rotation makes too: the API gives the new
  // key the old key's lifetime from now, or the acting key's expiry when that is earlier (or
  // the old key never expires), so "the same" would not be what happens (as the Create form's
  // Expires hint says). The token dialog says it again from the API's answer.
  const acting = session.operator ? undefined : session.keys.find((k) => k.id === session.keyId);
  const life = rotationLife(key);
  const now = Date.now();
  const bound = acting && acting.expires_at &&
    (life === null || Date.parse(acting.expires_at) < now + life) ? acting.expires_at : null;
  openDialog("Rotate key " + key.name, (dialog, close) => {
    const problem = errorBox();
    const grace = el("input", {"id": "rotate-grace", "value": "0", "autocomplete": "off",
                               "aria-describedby": "rotate-grace-hint"});
    const confirm = oneAtATime(dialog, async () => {
      const mine = session;
      let seconds;
      try {
        seconds = parseDuration(grace.value);
      } catch (err) {  // nothing sent: the field says what it takes
        showProblem(problem, err.message);
        grace.setAttribute("aria-invalid", "true");
        grace.focus();
        return;
      }
      grace.removeAttribute("aria-invalid");
      let rotated;
      try {
        rotated = await api("POST", keyPath(key) + "/rotate", {grace_seconds: seconds});
      } catch (err) {
        showProblem(problem, describe(err));
        return;
      }
      if (session !== mine) {  // signed out meanwhile: the token still goes to the person
        showTokenDialog("Key rotated", rotated.token, rotated.key, key);
        return;
      }
      close();
      announce("Key " + key.name + " rotated.");
      showTokenDialog("Key rotated", rotated.token, rotated.key, key);
      await refreshQuietly();
    }, "Rotating…");
    dialog.append(el("form", {"novalidate": true, "on": {submit: confirm}},
      el("p", {"text": "A new key with the same name, role or scopes and rate limit replaces " +
                       key.prefix + "…. The old key keeps working for the grace period " +
                       "(0 revokes it now)."}),
      bound ? el("p", {"class": "warning", "text": "The new key expires " + when(bound) +
                       ", when the key you are signed in with expires (a key it makes cannot " +
                       "outlive it), not " + uncutLife(key, now) + ". The integration needs " +
                       "a new token by then."})
            : "",
      own ? el("p", {"class": "warning", "text": "This is the key you are signed in with: " +
                                                 "when the old key stops working, this page " +
                                                 "signs out; sign in again with the new token."})
          : "",
      el("label", {"for": "rotate-grace", "text": "Grace"}), grace,
      el("p", {"id": "rotate-grace-hint", "class": "hint",
               "text": "0, or a duration such as 30m, 24h or 7d."}),
      problem,
      el("div", {"class": "actions"},
         el("button", {"type": "submit", "class": "primary", "text": "Rotate"}),
         el("button", {"type": "button", "text": "Cancel", "on": {click: close}}))));
    // Focus on the dialog's title, not in Grace: there (prefilled 0) a second Enter, from a
    // double press on the row's Rotate or a key held down, rotated at once with no grace and
    // revoked the old key, still deployed, before a word of the dialog was read. On the title
    // an Enter does nothing (on Cancel, a held key would close and reopen the dialog in turn);
    // Tab goes on to Grace.
    const heading = dialog.querySelector("h2");
    heading.setAttribute("tabindex", "-1");
    heading.setAttribute("autofocus", "");
  });
}

async function toggleKey(key) {
  const enable = key.enabled === false;
  if (!enable && key.id === session.keyId) {
    // the page signs out at once and the key cannot enable itself again: ask, as Revoke does
    confirmDialog(
      "Disable key " + key.name + "?", "Disable",
      () => api("PATCH", keyPath(key), {enabled: false}), "Key " + key.name + " disabled.",
      el("p", {"text": "Requests with " + key.prefix + "… are refused until the key is " +
                       "enabled again."}),
      el("p", {"class": "warning", "text": "This is the key you are signed in with: this page " +
                                           "loses access too, and this key cannot enable " +
                                           "itself again."}));
    return;
  }
  const done = waitingLine((enable ? "Enabling" : "Disabling") + " key " + key.name + "…");
  try {
    await api("PATCH", keyPath(key), {enabled: enable});
  } catch (err) {
    showAlert(describe(err));
    return;
  } finally {
    done();
  }
  showAlert("");
  announce("Key " + key.name + (enable ? " enabled." : " disabled: its requests are refused " +
                                                     "until it is enabled again."));
  await refreshQuietly();
}

function deleteKey(key) {
  confirmDialog(
    "Delete key " + key.name + "?", "Delete",
    () => api("DELETE", keyPath(key)), "Key " + key.name + " deleted from the list.",
    el("p", {"text": "The " + key.status + " key " + key.prefix + "… leaves this list. " +
                     "Its entries in the audit stay."}));
}

function editKey(key) {
  openDialog("Edit key " + key.name, (dialog, close) => {
    const problem = errorBox();
    const role = el("select", {"id": "edit-role"});
    fillRoles(role, key.role || "");
    const scopesText = key.role === null ? key.scopes.join(" ") : "";
    const scopes = el("input", {"id": "edit-scopes", "value": scopesText, "autocomplete": "off",
                                "spellcheck": "false"});
    const expiresText = key.expires_at || "";
    const expires = el("input", {"id": "edit-expires", "value": expiresText,
                                 "autocomplete": "off", "spellcheck": "false",
                                 "aria-describedby": "edit-expires-hint"});
    const controls = hasControls(key);
    const capText = controls && key.monthly_requests !== null ? String(key.monthly_requests) : "";
    const rateText = key.rate_limit || "";
    const wsRate = ((session.usage && session.usage.limits) || session.workspace.limits ||
                    {}).rate_limit;
    const cap = el("input", {"id": "edit-cap", "value": capText, "inputmode": "numeric",
                             "autocomplete": "off", "aria-describedby": "edit-cap-hint"});
    const rate = el("input", {"id": "edit-rate", "value": rateText, "autocomplete": "off",
                              "spellcheck": "false", "aria-describedby": "edit-cap-hint"});
    let asked = null;  // the change the person was warned of (one's own key), as JSON
    const cancel = el("button", {"type": "button", "text": "Cancel", "on": {click: close}});
    const save = oneAtATime(dialog, async () => {
      const body = {};
      if (controls && cap.value.trim() !== capText) {
        const value = cap.value.trim();
        if (value !== "" && !/^\d{1,12}$/.test(value)) {
          showProblem(problem, "Monthly cap must be a whole number of requests, or empty.");
          return;
        }
        body.monthly_requests = value === "" ? null : Number(value);
      }
      if (controls && rate.value.trim() !== rateText) {
        body.rate_limit = rate.value.trim() === "" ? null : rate.value.trim();
      }
      const roleChanged = role.value !== (key.role || "");
      const scopesChanged = scopes.value.trim() !== scopesText;
      if (roleChanged || scopesChanged) {  // both given: the API says why not
        if (role.value !== "") body.role = role.value;
        if (role.value === "" || (scopesChanged && splitScopes(scopes.value).length > 0)) {
          body.scopes = splitScopes(scopes.value);
        }
      }
      if (expires.value.trim() !== expiresText) {
        try {
          const expiry = parseExpiry(expires.value);
          body.expires_at = expiry.never ? null : expiry.at !== undefined ? expiry.at
            : new Date(serverNow() + expiry.seconds * 1000).toISOString()
              .replace(/\.\d{3}Z$/, "Z");
        } catch (err) {
          showProblem(problem, err.message);
          return;
        }
      }
      if (Object.keys(body).length === 0) {
        close();
        return;
      }
      const lockout = key.id === session.keyId ? lockoutOf(body) : null;
      if (lockout !== null && asked !== JSON.stringify(body)) {
        // one's own key, as Disable, Revoke and Rotate ask: say so, and save only when Save is
        // pressed again on the same change (focus on Cancel: a second Enter does not save)
        asked = JSON.stringify(body);
        showProblem(problem, "This is the key you are signed in with: " + lockout +
                    " Press Save again to save anyway.");
        cancel.focus();
        return;
      }
      try {
        await api("PATCH", keyPath(key), body);
      } catch (err) {
        showProblem(problem, describe(err));
        return;
      }
      close();
      announce("Key " + key.name + " updated.");
      await refreshQuietly();
    }, "Saving…");
    dialog.append(el("form", {"novalidate": true, "on": {submit: save}},
      el("div", {"class": "grid"},
         el("label", {"for": "edit-role", "text": "Role"}), role,
         el("label", {"for": "edit-scopes", "text": "Scopes"}), scopes,
         el("label", {"for": "edit-expires", "text": "Expires"}), expires,
         el("p", {"id": "edit-expires-hint", "class": "hint span",
                  "text": "Empty for never; a duration from now such as 30d; or a date."}),
         ...(controls ? [
           el("label", {"for": "edit-cap", "text": "Monthly cap"}), cap,
           el("label", {"for": "edit-rate", "text": "Rate limit"}), rate,
           el("p", {"id": "edit-cap-hint", "class": "hint span",
                    "text": "This key's own limits, such as 10000 requests a month and 10/s " +
                            "or 600/m; empty for none of its own. Its rate is held within the " +
                            "workspace's" + (wsRate ? " (" + wsRate + ")." : ".")})] : [])),
      problem,
      el("div", {"class": "actions"},
         el("button", {"type": "submit", "class": "primary", "text": "Save"}),
         cancel)));
  });
}

// What a PATCH `body` of the key one is signed in with does to this page, or null: re-bound to
// scopes without keys:admin (or "ALL"), it signs out at once and the key cannot give itself
// keys:admin back; with an expiry in the past or within the hour, it signs out then (one in the
// past the API refuses, but it is said first all the same).
const LOCKOUT_WITHIN_MS = 3600 * 1000;

function lockoutOf(body) {
  let granted = null;
  if (typeof body.role === "string") {
    const role = session.roles.find((r) => r.name === body.role);
    granted = role ? role.scopes : null;  // a role the page has not read: the API judges it
  } else if (Array.isArray(body.scopes)) {
    granted = body.scopes;
  }
  if (granted !== null && !granted.includes("keys:admin") && !granted.includes("ALL")) {
    return "without keys:admin it cannot manage keys, so this page signs out at once, and " +
           "this key cannot give itself keys:admin back.";
  }
  if (typeof body.expires_at === "string" &&
      Date.parse(body.expires_at) <= serverNow() + LOCKOUT_WITHIN_MS) {
    return "expiring at " + when(body.expires_at) + ", it stops working then and this " +
           "page signs out; an expired key cannot extend itself again.";
  }
  return null;
}

// --- wiring ------------------------------------------------------------------------------------

$("signin-form").addEventListener("submit",
                                  oneAtATime($("signin-form"), signIn, "Signing in…"));
$("sign-out").addEventListener("click", signOut);
$("back").addEventListener("click", backToWorkspaces);
$("create-open").addEventListener("click", openCreateForm);
$("filter-status").addEventListener("change", renderKeys);
$("filter-unused").addEventListener("input", renderKeys);
$("sort").addEventListener("change", sortBy);
for (const th of $("keys").tHead.rows[0].cells) {
  const field = th.dataset.sort;
  if (field) th.querySelector("button").addEventListener("click", () => sortByColumn(field));
}
$("ws-title").setAttribute("tabindex", "-1");
$("workspaces-title").setAttribute("tabindex", "-1");
// A shown-once token on screen (or one waiting for the Done of another) is the only copy of a
// live key's token: a reload, Back, a closed tab or a typed address loses it, so the browser
// asks first ("Leave site?"). Only then: with no token on screen, leaving is free.
window.addEventListener("beforeunload", (event) => {
  if (!tokenOnScreen() && waitingDialogs.length === 0) return;
  event.preventDefault();
  // older browsers ask only when returnValue holds a text
  event.returnValue = "A new key's token is on screen and cannot be shown again.";
});
// Leaving the page signs out, as reloading it does: the browser may keep a page it leaves in
// its back/forward cache, script state included, and Back would then bring back the session
// (token and all) and any shown-once token to whoever is at the screen next.
window.addEventListener("pagehide", () => {
  closeDialogs();
  signOut();
  $("token").value = "";  // a token typed and not sent yet is not left for Back either
});
document.documentElement.dataset.ready = "true";
