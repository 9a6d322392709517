// The token form. The token lives in memory; only when the person ticks "Remember on
// this device" is it kept in localStorage (per origin: this host and port), and a token
// the server refuses is forgotten. It never goes into the URL.

import { setText } from "./dom.js";

const KEY = "session-buddy-realtime.token";
const $ = (id) => document.getElementById(id);

/** The saved token, or null (also when storage is disabled). */
export function savedToken() {
  try {
    return window.localStorage.getItem(KEY);
  } catch {
    return null;
  }
}

function save(token) {
  try {
    if (token === null) window.localStorage.removeItem(KEY);
    else window.localStorage.setItem(KEY, token);
  } catch {
    // storage disabled or full: the token stays in memory for this page
  }
  $("forget-token").hidden = savedToken() === null;
}

export class TokenForm {
  /** `authenticate(token)` reconnects with the token. */
  constructor(authenticate) {
    this.box = $("auth");
    this.field = $("auth-token");
    this.remember = $("auth-remember");
    this.remember.checked = savedToken() !== null;
    $("forget-token").hidden = savedToken() === null;
    $("forget-token").addEventListener("click", () => {
      save(null);
      this.remember.checked = false;
    });
    $("auth-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = this.field.value.trim();
      if (!token) return;
      save(this.remember.checked ? token : null);
      this.field.value = "";
      setText($("auth-message"), "Connecting…");
      this.box.dataset.rejected = "false";
      authenticate(token);
    });
  }

  /** Ask for the token; `state` is the connection's "unauthorized" state. */
  show(state) {
    if (state.rejected) save(null);
    setText($("auth-message"), state.message);
    this.box.dataset.rejected = state.rejected ? "true" : "false";
    const wasHidden = this.box.hidden;
    this.box.hidden = false;
    if (wasHidden || state.rejected) this.field.focus();
  }

  hide() {
    this.box.hidden = true;
  }
}
