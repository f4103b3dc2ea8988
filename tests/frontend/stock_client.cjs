"use strict";
/*
 * The stock Dara frontend client, run in node: the real `WebSocketClient` of the dara-core wheel's
 * built bundle (`dara/core/_assets/auto_js/dara.core.umd.cjs`), driven over stdin/stdout.
 *
 *   node stock_client.cjs <bundle>
 *
 * stdin: one JSON command a line; stdout: one JSON event a line (every event has `ev`). The
 * bundle is loaded with small stand-ins for its externals (React and friends are only touched at
 * load, to create contexts and styled components) and for the page: `window.location` of the page
 * the app was served from, `document.cookie` (the session cookie the browser sends with the
 * handshake), a browser `WebSocket` (browser_websocket.cjs) and `fetch` (the client calls
 * `/api/auth/verify-session` after a connection that never got `init`; it answers 200 as Dara's
 * server does for a live session, and the call is reported).
 *
 * Commands (`id` is echoed in the command's own answer, `{"ev": "done", "id": ...}`):
 *   {"cmd": "page", "origin": "http://127.0.0.1:PORT", "cookie": "dara_session_token=...",
 *    "interval_scale": 10}   the page; `interval_scale` runs the client's intervals (its 5 s
 *                           ping) that many times faster; its timeouts (reconnects) run as they are
 *   {"cmd": "connect"}         `setupWebsocket(false)`, as the authenticated root does, and the
 *                              subscriptions an app makes (channel$, serverErrors$, the stores'
 *                              observables, variableRequests$ answered as VariableStateProvider
 *                              does, customMessages$)
 *   {"cmd": "variables", "values": {uid: value}}   the variables this page has registered
 *   {"cmd": "get_channel"}     awaits `getChannel()`
 *   {"cmd": "custom", "kind", "data", "await": bool}   `sendCustomMessage`; with await, the reply
 *   {"cmd": "send_message", "value", "channel", "chunk_count"}   `sendMessage` (an answer)
 *   {"cmd": "watch_action", "uid"}   `actionMessages$(uid)` taken while truthy, as executeAction
 *   {"cmd": "wait_task", "task_id"}  `waitForTask` plus `progressUpdates$` / `taskStatusUpdates$`
 *   {"cmd": "close"}          `client.close()`
 *   {"cmd": "exit"}
 *
 * Events: `loaded`, `done`, `frame` (every parsed frame of `messages$`), `channel` (channel$),
 * `variable_request`, `server_error`, `backend_store`, `backend_store_patch`, `server_variable`,
 * `custom` (customMessages$), `reply`, `action`, `action_done`, `task_status`, `task_progress`,
 * `task_done`, `task_failed`; the socket's `ws_open`, `ws_handshake`, `ws_ping`, `ws_close`,
 * `ws_violation`; the page's `fetch`, `timer`, `console` (every console call, with its level)
 * and `uncaught` (an exception or rejection nothing caught, as a browser's console shows it).
 */

const Module = require("module");
const readline = require("readline");
const { BrowserWebSocket, hooks } = require("./browser_websocket.cjs");

const realSetInterval = globalThis.setInterval;

function emit(event) {
  process.stdout.write(JSON.stringify({ ...event, t: Math.round(performance.now()) }) + "\n");
}

function text(args) {
  return args.map((a) => (a instanceof Error ? `${a.name}: ${a.message}` : typeof a === "string" ? a : safeJson(a))).join(" ");
}

function safeJson(value) {
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

for (const level of ["log", "info", "debug", "warn", "error", "trace"]) {
  console[level] = (...args) => emit({ ev: "console", level, text: text(args) });
}
process.on("uncaughtException", (err) => emit({ ev: "uncaught", text: text([err]) }));
process.on("unhandledRejection", (err) => emit({ ev: "uncaught", text: `unhandled rejection: ${text([err])}` }));

// ---------------------------------------------------------------------- the bundle's externals

/** A value that is any function, object or constructor its caller takes it for. */
function anything(name) {
  return new Proxy(function () {}, {
    get(target, key) {
      if (key === "prototype") return target.prototype;
      if (typeof key === "symbol") return key === Symbol.toPrimitive ? () => `[${name}]` : undefined;
      return anything(`${name}.${key}`);
    },
    apply: () => anything(`${name}()`),
    construct: () => anything(`new ${name}`),
  });
}

const EXTERNALS = {
  react: "Children Component Fragment Profiler PureComponent StrictMode Suspense " +
    "__SECRET_INTERNALS_DO_NOT_USE_OR_YOU_WILL_BE_FIRED cloneElement createContext createElement " +
    "createFactory createRef forwardRef isValidElement lazy memo startTransition useCallback useContext " +
    "useDebugValue useDeferredValue useEffect useId useImperativeHandle useInsertionEffect " +
    "useLayoutEffect useMemo useReducer useRef useState useSyncExternalStore useTransition version",
  "react-dom": "createPortal findDOMNode flushSync hydrate render unmountComponentAtNode " +
    "unstable_batchedUpdates version __SECRET_INTERNALS_DO_NOT_USE_OR_YOU_WILL_BE_FIRED",
  "styled-components": "default css keyframes createGlobalStyle ThemeProvider ThemeContext useTheme " +
    "withTheme ServerStyleSheet StyleSheetManager isStyledComponent",
  "@tanstack/react-query": "QueryClient QueryClientProvider useQuery useMutation useQueryClient",
};

function external(name) {
  // Callable, as the bundle calls styled-components' namespace itself; its names are own
  // properties, as the bundle copies them (__toESM). styled-components is an ES module in CJS.
  const module = function () { return anything(`${name}()`); };
  for (const key of EXTERNALS[name].split(" ")) module[key] = anything(`${name}.${key}`);
  if (name === "styled-components") Object.defineProperty(module, "__esModule", { value: true });
  return module;
}

const realLoad = Module._load;
Module._load = function (request, ...rest) {
  if (Object.prototype.hasOwnProperty.call(EXTERNALS, request)) return external(request);
  return realLoad.call(this, request, ...rest);
};

// ---------------------------------------------------------------------- the page

const page = { origin: "http://127.0.0.1", cookie: "", intervalScale: 1 };
const element = () => ({ style: {}, addEventListener() {}, removeEventListener() {}, appendChild() {}, setAttribute() {} });
const document = {
  documentElement: element(),
  body: element(),
  head: element(),
  createElement: element,
  readyState: "loading",  // the bundle's focus/transition trackers then wait for DOMContentLoaded
  visibilityState: "visible",
  get cookie() { return page.cookie; },
  addEventListener() {},
  removeEventListener() {},
};
const location = {
  get host() { return new URL(page.origin).host; },
  get protocol() { return new URL(page.origin).protocol; },
  get origin() { return page.origin; },
  get href() { return `${page.origin}/`; },
  reload() { emit({ ev: "reload" }); },
};
const window = {
  document,
  location,
  get origin() { return page.origin; },
  dara: {},
  getComputedStyle: () => ({ fontSize: "16px" }),
  addEventListener() {},
  removeEventListener() {},
};
globalThis.window = window;
globalThis.document = document;
globalThis.WebSocket = BrowserWebSocket;
if (!globalThis.crypto) globalThis.crypto = require("crypto").webcrypto;  // node 18
globalThis.fetch = async (url, options) => {
  emit({ ev: "fetch", url: String(url), method: options?.method ?? "GET" });
  return { ok: true, status: 200, json: async () => ({}), text: async () => "" };
};
globalThis.setInterval = (callback, delay, ...args) => {
  emit({ ev: "timer", kind: "interval", delay });
  return realSetInterval(callback, Math.max(1, Math.round(delay / page.intervalScale)), ...args);
};

hooks.cookie = () => page.cookie;
hooks.origin = () => page.origin;
hooks.opened = (ws) => emit({ ev: "ws_open", socket: ws.index, url: ws.url, extensions: ws.extensions, protocol: ws.protocol });
hooks.handshake = (ws, status, headers) => emit({ ev: "ws_handshake", socket: ws.index, status, headers });
hooks.violation = (ws, why) => emit({ ev: "ws_violation", socket: ws.index, why });
hooks.serverPing = (ws) => emit({ ev: "ws_ping", socket: ws.index });
hooks.closed = (ws, details) => emit({ ev: "ws_close", socket: ws.index, ...details });

// ---------------------------------------------------------------------- the client

const dara = require(process.argv[2]);
let client = null;
const variables = new Map();

function subscribe(observable, ev) {
  observable.subscribe((msg) => emit({ ev, msg }));
}

function connect() {
  client = dara.setupWebsocket(false);
  // What an app subscribes to: the raw subject (to see every frame), and each observable a
  // component of @darajs/core subscribes to.
  subscribe(client.messages$, "frame");
  client.channel$().subscribe((channel) => emit({ ev: "channel", channel }));
  subscribe(client.serverErrors$(), "server_error");
  subscribe(client.backendStoreMessages$(), "backend_store");
  subscribe(client.backendStorePatchMessages$(), "backend_store_patch");
  subscribe(client.serverVariableMessages$(), "server_variable");
  subscribe(client.customMessages$(), "custom");
  // VariableStateProvider: resolve the variable, answer with sendVariable on its __rchan;
  // a variable this page does not have is "__NOT_REGISTERED__" (useVariableState).
  client.variableRequests$().subscribe(async (req) => {
    emit({ ev: "variable_request", msg: req });
    try {
      const uid = req.message.variable?.uid;
      const value = variables.has(uid) ? variables.get(uid) : "__NOT_REGISTERED__";
      client.sendVariable(value, req.message.__rchan);
    } catch (err) {
      console.warn(`Error when processing a getVariableValue request: ${String(err)}`);
    }
  });
}

const commands = {
  page(cmd) {
    page.origin = cmd.origin;
    page.cookie = cmd.cookie ?? "";
    page.intervalScale = cmd.interval_scale ?? 1;
  },
  connect,
  variables(cmd) {
    for (const [uid, value] of Object.entries(cmd.values)) variables.set(uid, value);
  },
  async get_channel() {
    return { channel: await client.getChannel() };
  },
  async custom(cmd) {
    const reply = await client.sendCustomMessage(cmd.kind, cmd.data, !!cmd.await);
    return { reply };
  },
  send_message(cmd) {
    client.sendMessage(cmd.value, cmd.channel, cmd.chunk_count ?? undefined);
  },
  watch_action(cmd) {
    // executeAction: actionMessages$(executionId) taken while the action is truthy.
    const sub = client.actionMessages$(cmd.uid).subscribe((action) => {
      if (!action) {
        sub.unsubscribe();
        emit({ ev: "action_done", uid: cmd.uid });
        return;
      }
      emit({ ev: "action", uid: cmd.uid, action });
    });
  },
  wait_task(cmd) {
    const id = cmd.task_id;
    const progress = client.progressUpdates$(id).subscribe((msg) => emit({ ev: "task_progress", task_id: id, msg }));
    const status = client.taskStatusUpdates$(id).subscribe((s) => emit({ ev: "task_status", task_id: id, status: s }));
    client.waitForTask(id).then(
      (msg) => emit({ ev: "task_done", task_id: id, msg }),
      (err) => emit({ ev: "task_failed", task_id: id, error: err.constructor.name, message: err.message, err_task_id: err.task_id }),
    ).finally(() => {
      progress.unsubscribe();
      status.unsubscribe();
    });
  },
  close() {
    client.close();
  },
  exit() {
    process.exit(0);
  },
};

const input = readline.createInterface({ input: process.stdin });
input.on("line", async (line) => {
  if (!line.trim()) return;
  const cmd = JSON.parse(line);
  const run = commands[cmd.cmd];
  if (!run) {
    emit({ ev: "done", id: cmd.id, error: `unknown command ${cmd.cmd}` });
    return;
  }
  try {
    emit({ ev: "done", id: cmd.id, ...(await run(cmd)) });
  } catch (err) {
    emit({ ev: "done", id: cmd.id, error: text([err]) });
  }
});
input.on("close", () => process.exit(0));  // the test ended: nothing of the page outlives it
emit({ ev: "loaded", node: process.version, exports: ["WebSocketClient", "setupWebsocket"].filter((n) => typeof dara[n] === "function") });
