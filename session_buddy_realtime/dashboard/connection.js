// The WebSocket side of the dashboard: one connection at a time, authentication as
// docs/protocol.md and docs/security.md describe it, and reconnection with capped
// exponential backoff and jitter (so that many tabs do not hammer a restarting server
// in step).

/** Close code of a refused or missing token (see docs/protocol.md, "Close codes"). */
export const AUTH_FAILED = 4001;
const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 30_000;
// Error codes that mean "authenticate first". The server sends `not_authenticated`; the
// other two are accepted in case a later server names it differently.
const AUTH_ERRORS = new Set(["not_authenticated", "unauthorized", "auth_required"]);
// Which reply answers which request: the server answers requests in order, but its
// `error` reply does not say which request it refuses, so the client keeps the order.
const REPLY_OF = {
  subscription_confirmed: "subscribe",
  unsubscribed: "unsubscribe",
  pong: "ping",
  authenticated: "auth",
  history: "history",
  skills: "skills",
};

/** The server's WebSocket URL: same host and port as the page, wss: under https:. */
export function socketUrl(loc = window.location) {
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/`;
}

/** Delay before reconnection attempt `attempt` (0-based): "equal jitter", capped. */
export function backoffDelay(attempt, random = Math.random) {
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

/**
 * A self-reconnecting connection.
 *
 * Callbacks: onState(state) with state.name one of "connecting", "live", "reconnecting",
 * "unauthorized"; onReady(welcome) once per connection when metrics may be requested;
 * onMessage(message, request) for every server message (`request` is the kind of client
 * message an `error` answers, when known).
 */
export class Connection {
  constructor({ url, onState, onReady, onMessage }) {
    this.url = url;
    this.onState = onState;
    this.onReady = onReady;
    this.onMessage = onMessage;
    this.token = null; // kept in memory; the app decides whether it is stored
    this.socket = null;
    this.attempt = 0; // failed attempts since the last connection that got data
    this.timer = null;
    this.ready = false;
    this.pending = [];
    this.welcome = null;
  }

  /** Open a connection now, dropping any current one or pending retry. */
  connect() {
    this.drop();
    this.ready = false;
    this.pending = [];
    this.sentToken = null;
    this.setState({ name: "connecting", attempt: this.attempt });
    const socket = new WebSocket(this.url);
    this.socket = socket;
    socket.addEventListener("open", () => this.opened(socket));
    socket.addEventListener("message", (event) => this.received(socket, event));
    socket.addEventListener("close", (event) => this.closed(socket, event));
  }

  /** Connect again with this token, sent as the first (`auth`) message. */
  authenticate(token) {
    this.token = token;
    this.attempt = 0;
    this.connect();
  }

  /** Send a request; false when the connection cannot take it now. */
  send(message) {
    if (!this.ready || this.socket?.readyState !== WebSocket.OPEN) return false;
    this.pending.push(message.type);
    this.socket.send(JSON.stringify(message));
    return true;
  }

  drop() {
    clearTimeout(this.timer);
    this.timer = null;
    if (this.socket) {
      const socket = this.socket;
      this.socket = null; // its close event is ignored from now on
      if (socket.readyState <= WebSocket.OPEN) socket.close(1000);
    }
  }

  setState(state) {
    this.state = state;
    this.onState(state);
  }

  opened(socket) {
    if (socket !== this.socket) return;
    // The token goes in the first message, never in the URL (it would reach logs and
    // the browser history).
    if (this.token !== null) {
      this.sentToken = this.token;
      this.pending.push("auth");
      socket.send(JSON.stringify({ type: "auth", token: this.token }));
    }
  }

  received(socket, event) {
    if (socket !== this.socket || typeof event.data !== "string") return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return; // not ours to show; the server only sends JSON
    }
    if (message === null || typeof message !== "object") return;
    let request = null;
    if (message.type === "error") {
      request = this.pending.shift() ?? null;
    } else if (Object.hasOwn(REPLY_OF, message.type)) {
      // Pop up to the request this answers: a request refused by the rate limiter
      // gets no reply at all.
      const kind = REPLY_OF[message.type];
      const index = this.pending.indexOf(kind);
      if (index >= 0) this.pending.splice(0, index + 1);
    }

    if (message.type === "connected") {
      this.welcome = message;
      if (!message.auth_required || message.authenticated) this.becomeReady();
      else if (this.sentToken === null) this.needToken("This server needs a token.");
      // Otherwise our `auth` is on its way: `authenticated` or a 4001 close follows.
    } else if (message.type === "authenticated" && !this.ready) {
      this.becomeReady();
    } else if (message.type === "error" && AUTH_ERRORS.has(message.code)) {
      this.needToken("This server needs a token.");
      return;
    } else if (message.type === "metrics_update") {
      this.attempt = 0; // this server really works: the next outage starts from 0.5 s
    }
    this.onMessage(message, request);
  }

  becomeReady() {
    this.ready = true;
    this.setState({ name: "live" });
    this.onReady(this.welcome);
  }

  /** Stop and ask for a token; nothing reconnects until authenticate() is called. */
  needToken(message, rejected = false) {
    this.drop();
    this.ready = false;
    this.setState({ name: "unauthorized", message, rejected });
  }

  closed(socket, event) {
    if (socket !== this.socket) return; // one we dropped on purpose
    this.socket = null;
    this.ready = false;
    if (event.code === AUTH_FAILED) {
      const reason = event.reason || "authentication failed";
      if (/too many/i.test(reason)) {
        this.needToken(`The server refuses for now: ${reason}.`);
      } else if (this.sentToken !== null) {
        this.token = null;
        this.needToken("The server refused the token. Check it and try again.", true);
      } else {
        this.needToken(`This server needs a token (${reason}).`);
      }
      return;
    }
    const delay = backoffDelay(this.attempt);
    this.attempt += 1;
    this.setState({
      name: "reconnecting",
      attempt: this.attempt,
      at: Date.now() + delay,
      code: event.code,
      reason: event.reason,
    });
    this.timer = setTimeout(() => this.connect(), delay);
  }
}
