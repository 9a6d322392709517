// The "Find a skill" box: asks the server for matching names (the `skills` message) as
// the person types, lists them as buttons, and drills down into the one picked, or into
// exactly what was typed on Enter (any skill name is valid, known or not).

import { el, replaceChildren, setText } from "./dom.js";

const DELAY_MS = 200; // typing sends at most ~5 requests/s, far below the rate limit

const $ = (id) => document.getElementById(id);

export class Search {
  /**
   * `send(message)` sends a request (false when not connected); `onPick(name)` shows a
   * skill alone.
   */
  constructor({ send, onPick }) {
    this.send = send;
    this.onPick = onPick;
    this.query = null; // the last query sent: older replies are ignored
    this.supported = true; // false once the server answers `unknown_type`
    this.timer = null;
    this.input = $("search-input");
    this.list = $("search-results");
    this.status = $("search-status");
    this.input.addEventListener("input", () => {
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.ask(), DELAY_MS);
    });
    this.input.addEventListener("focus", () => {
      if (this.list.hidden) this.ask(); // an empty query lists the most invoked skills
    });
    this.input.addEventListener("keydown", (event) => this.keyInBox(event));
    this.list.addEventListener("keydown", (event) => this.keyInList(event));
    $("search-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const name = this.input.value.trim();
      if (!name) return;
      this.close();
      this.onPick(name);
    });
  }

  /** Send the current query now. */
  ask() {
    clearTimeout(this.timer);
    if (!this.supported) return;
    this.query = this.input.value.trim();
    this.send({ type: "skills", query: this.query });
  }

  /** After a reconnection: ask again if matches are on screen. */
  refresh() {
    if (this.query !== null && !this.list.hidden) this.ask();
  }

  /** A `skills` reply. */
  results(message) {
    if (message.query !== this.query) return;
    const names = Array.isArray(message.skills) ? message.skills : [];
    this.show(names.filter((name) => typeof name === "string"));
  }

  /** The server does not know `skills`: Enter on a full name still works. */
  unsupported() {
    this.supported = false;
    this.show([]);
    setText(this.status, "This server cannot search names; press Enter to follow the name typed.");
  }

  show(names) {
    replaceChildren(
      this.list,
      ...names.map((name) => {
        const button = el("button", { type: "button", class: "result" }, name);
        button.addEventListener("click", () => {
          this.close();
          this.onPick(name);
        });
        return el("li", {}, button);
      }),
    );
    this.list.hidden = names.length === 0;
    if (this.supported) {
      setText(this.status, names.length ? `${names.length} matching skills` : "No skill matches.");
    }
  }

  close() {
    this.list.hidden = true;
    this.input.value = "";
    if (this.supported) setText(this.status, "");
  }

  keyInBox(event) {
    if (event.key === "Escape") this.close();
    if (event.key === "ArrowDown" && !this.list.hidden) {
      event.preventDefault();
      this.list.querySelector("button")?.focus();
    }
  }

  keyInList(event) {
    // Up and down move between matches; above the first, and Escape, return to the box.
    const buttons = [...this.list.querySelectorAll("button")];
    const index = buttons.indexOf(document.activeElement);
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      const next = index + (event.key === "ArrowDown" ? 1 : -1);
      if (next < 0) this.input.focus();
      else buttons[Math.min(next, buttons.length - 1)]?.focus();
    } else if (event.key === "Escape") {
      this.input.focus();
      this.close();
    }
  }
}
