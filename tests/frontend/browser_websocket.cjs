"use strict";
/*
 * A browser's WebSocket, for node: the WHATWG `WebSocket` interface on an RFC 6455 client written
 * on node's `net` module (ws:// only), so the stock Dara client runs unchanged on any node version
 * (node 18 has no global WebSocket, and node's own differs from a browser's in small ways).
 *
 * It behaves the way a browser does where the Dara client can tell:
 *  - the handshake carries what Chrome sends: Origin (the page's), the page's cookies,
 *    `Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits`, no subprotocol;
 *  - frames are masked; server pings get pongs; a close frame is echoed with its status code;
 *    `close()` without a code sends a close frame with no status;
 *  - each message, error and close is dispatched in a task of its own (a browser queues one task
 *    per event), so promise callbacks run between two messages as they do in a page;
 *  - a refused or failed connection fires `error`, then `close` with code 1006; a reset after
 *    the server's close frame gives that frame's code with `wasClean` false, as in Chrome.
 *
 * It is strict where a browser "fails the WebSocket connection": a bad handshake answer (status,
 * Upgrade/Connection, Sec-WebSocket-Accept, an extension or subprotocol not offered), a masked
 * or reserved frame, invalid UTF-8 in text, a bad close frame. Each such failure is reported to
 * `hooks.violation(why)`, so a test sees it as a finding rather than a silent 1006.
 *
 * permessage-deflate is offered as a browser offers it, but not decoded: a server that accepts it
 * gets a reported violation ("negotiated permessage-deflate"), since every adapter of this
 * project turns compression off and a server that stops doing so should be noticed.
 */

const crypto = require("crypto");
const net = require("net");

const CONNECTING = 0;
const OPEN = 1;
const CLOSING = 2;
const CLOSED = 3;
const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const MAX_HANDSHAKE = 16 * 1024;
const CLOSE_TIMEOUT_MS = 3000;

/** Hooks the harness sets: `cookie(host)` gives the Cookie header of the page for a host,
 * `origin()` the page's origin, and the observers called as things happen on the wire. */
const hooks = {
  cookie: () => "",
  origin: () => "null",
  opened: (_ws) => {},
  handshake: (_ws, _status, _headers) => {},
  violation: (_ws, _why) => {},
  serverPing: (_ws) => {},
  closed: (_ws, _details) => {},
};

function makeEvent(type, fields) {
  const event = new Event(type);
  for (const [key, value] of Object.entries(fields || {})) {
    Object.defineProperty(event, key, { value, enumerable: true });
  }
  return event;
}

function validCloseCode(code) {
  return (code >= 1000 && code <= 1014 && ![1004, 1005, 1006].includes(code)) || (code >= 3000 && code <= 4999);
}

let socketCount = 0;

class BrowserWebSocket extends EventTarget {
  static CONNECTING = CONNECTING;
  static OPEN = OPEN;
  static CLOSING = CLOSING;
  static CLOSED = CLOSED;

  constructor(url, protocols) {
    super();
    const parsed = new URL(url);
    if (parsed.protocol !== "ws:") throw new SyntaxError(`this harness speaks ws:// only, not ${parsed.protocol}`);
    if (parsed.hash) throw new SyntaxError("a WebSocket URL has no fragment");
    if (protocols !== undefined && (!Array.isArray(protocols) || protocols.length)) {
      throw new SyntaxError("this harness offers no subprotocol");
    }
    this.url = parsed.href;
    this.index = ++socketCount;
    this.readyState = CONNECTING;
    this.protocol = "";
    this.extensions = "";
    this.binaryType = "blob";
    this.bufferedAmount = 0;
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    this._tasks = [];
    this._draining = false;
    this._buffer = Buffer.alloc(0);
    this._fragments = null;
    this._fragmentOpcode = 0;
    this._closeSent = false;
    this._closeReceived = null;
    this._failed = false;
    this._finished = false;
    this._key = crypto.randomBytes(16).toString("base64");
    this._host = parsed.host;
    const port = Number(parsed.port || 80);
    this._socket = net.connect({ host: parsed.hostname, port });
    this._socket.setNoDelay(true);
    this._socket.on("connect", () => this._sendHandshake(parsed));
    this._socket.on("data", (chunk) => this._onData(chunk));
    this._socket.on("error", (err) => {
      this._tcpError = err.code || err.message;
      this._fail(null);
    });
    this._socket.on("close", () => this._onTcpClose());
  }

  // ------------------------------------------------------------------ the WebSocket interface

  send(data) {
    if (this.readyState === CONNECTING) {
      throw new DOMException("Failed to execute 'send' on 'WebSocket': Still in CONNECTING state.", "InvalidStateError");
    }
    let opcode;
    let payload;
    if (typeof data === "string") {
      opcode = 1;
      payload = Buffer.from(data, "utf8");
    } else if (data instanceof ArrayBuffer) {
      opcode = 2;
      payload = Buffer.from(data);
    } else if (ArrayBuffer.isView(data)) {
      opcode = 2;
      payload = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    } else {
      opcode = 1;
      payload = Buffer.from(String(data), "utf8");
    }
    if (this.readyState !== OPEN) {  // a browser drops it and counts it as buffered
      this.bufferedAmount += payload.length;
      return;
    }
    this._writeFrame(opcode, payload);
  }

  close(code, reason) {
    if (code !== undefined && code !== 1000 && !(code >= 3000 && code <= 4999)) {
      throw new DOMException(`The close code must be either 1000, or between 3000 and 4999. ${code} is neither.`, "InvalidAccessError");
    }
    const reasonBytes = Buffer.from(reason === undefined ? "" : String(reason), "utf8");
    if (reasonBytes.length > 123) throw new DOMException("The close reason must not be greater than 123 UTF-8 bytes.", "SyntaxError");
    if (this.readyState === CLOSING || this.readyState === CLOSED) return;
    if (this.readyState === CONNECTING) {
      this._fail(null);
      return;
    }
    this.readyState = CLOSING;
    let payload = Buffer.alloc(0);
    if (code !== undefined) {
      payload = Buffer.alloc(2 + reasonBytes.length);
      payload.writeUInt16BE(code, 0);
      reasonBytes.copy(payload, 2);
    }
    this._sendClose(payload);
  }

  set onopen(f) { this._setHandler("open", f); }
  get onopen() { return this._handlers?.open ?? null; }
  set onmessage(f) { this._setHandler("message", f); }
  get onmessage() { return this._handlers?.message ?? null; }
  set onerror(f) { this._setHandler("error", f); }
  get onerror() { return this._handlers?.error ?? null; }
  set onclose(f) { this._setHandler("close", f); }
  get onclose() { return this._handlers?.close ?? null; }

  _setHandler(type, f) {
    this._handlers = this._handlers || {};
    if (this._handlers[type]) this.removeEventListener(type, this._handlers[type]);
    this._handlers[type] = typeof f === "function" ? f : null;
    if (this._handlers[type]) this.addEventListener(type, this._handlers[type]);
  }

  // ------------------------------------------------------------------ events, one task each

  _queue(event, before) {
    this._tasks.push([event, before]);
    if (!this._draining) {
      this._draining = true;
      setImmediate(() => this._drain());
    }
  }

  _drain() {
    const [event, before] = this._tasks.shift();
    if (before) before();
    this.dispatchEvent(event);
    if (this._tasks.length) setImmediate(() => this._drain());
    else this._draining = false;
  }

  // ------------------------------------------------------------------ handshake

  _sendHandshake(parsed) {
    const cookie = hooks.cookie(parsed.host);
    const lines = [
      `GET ${parsed.pathname}${parsed.search} HTTP/1.1`,
      `Host: ${parsed.host}`,
      "Connection: Upgrade",
      "Pragma: no-cache",
      "Cache-Control: no-cache",
      "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
      "Upgrade: websocket",
      `Origin: ${hooks.origin()}`,
      "Sec-WebSocket-Version: 13",
      "Accept-Encoding: gzip, deflate, br, zstd",
      "Accept-Language: en-US,en;q=0.9",
    ];
    if (cookie) lines.push(`Cookie: ${cookie}`);
    lines.push(`Sec-WebSocket-Key: ${this._key}`);
    lines.push("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits");
    this._socket.write(lines.join("\r\n") + "\r\n\r\n");
  }

  _readHandshake() {
    const end = this._buffer.indexOf("\r\n\r\n");
    if (end < 0) {
      if (this._buffer.length > MAX_HANDSHAKE) this._fail("handshake answer too long");
      return false;
    }
    const head = this._buffer.subarray(0, end).toString("latin1");
    this._buffer = this._buffer.subarray(end + 4);
    const [statusLine, ...headerLines] = head.split("\r\n");
    const match = /^HTTP\/1\.1 (\d{3})(?: (.*))?$/.exec(statusLine);
    const headers = {};
    for (const line of headerLines) {
      const colon = line.indexOf(":");
      if (colon <= 0) return this._fail(`malformed header line ${JSON.stringify(line)}`), false;
      const name = line.slice(0, colon).trim().toLowerCase();
      const value = line.slice(colon + 1).trim();
      headers[name] = name in headers ? `${headers[name]}, ${value}` : value;
    }
    const status = match ? Number(match[1]) : 0;
    hooks.handshake(this, status, headers);
    if (status !== 101) {
      // A refused handshake is not a protocol violation: a browser fails the connection quietly.
      this._fail(null);
      return false;
    }
    const expected = crypto.createHash("sha1").update(this._key + GUID).digest("base64");
    const tokens = (value) => (value || "").toLowerCase().split(",").map((t) => t.trim());
    let why = null;
    if ((headers.upgrade || "").toLowerCase() !== "websocket") why = `Upgrade is ${JSON.stringify(headers.upgrade)}`;
    else if (!tokens(headers.connection).includes("upgrade")) why = `Connection is ${JSON.stringify(headers.connection)}`;
    else if (headers["sec-websocket-accept"] !== expected) why = "wrong Sec-WebSocket-Accept";
    else if (headers["sec-websocket-protocol"] !== undefined) why = `a subprotocol nobody asked for: ${headers["sec-websocket-protocol"]}`;
    else if (headers["sec-websocket-extensions"] !== undefined) {
      const names = tokens(headers["sec-websocket-extensions"]).map((e) => e.split(";")[0].trim());
      why = names.every((n) => n === "permessage-deflate")
        ? `negotiated permessage-deflate (${headers["sec-websocket-extensions"]}), which this harness does not decode`
        : `an extension that was not offered: ${headers["sec-websocket-extensions"]}`;
    }
    if (why) {
      this._fail(why);
      return false;
    }
    this._queue(makeEvent("open"), () => {
      this.readyState = OPEN;
      hooks.opened(this);
    });
    return true;
  }

  // ------------------------------------------------------------------ frames

  _writeFrame(opcode, payload) {
    const mask = crypto.randomBytes(4);
    let header;
    if (payload.length < 126) {
      header = Buffer.from([0x80 | opcode, 0x80 | payload.length]);
    } else if (payload.length < 65536) {
      header = Buffer.alloc(4);
      header[0] = 0x80 | opcode;
      header[1] = 0x80 | 126;
      header.writeUInt16BE(payload.length, 2);
    } else {
      header = Buffer.alloc(10);
      header[0] = 0x80 | opcode;
      header[1] = 0x80 | 127;
      header.writeBigUInt64BE(BigInt(payload.length), 2);
    }
    const masked = Buffer.alloc(payload.length);
    for (let i = 0; i < payload.length; i++) masked[i] = payload[i] ^ mask[i & 3];
    this._socket.write(Buffer.concat([header, mask, masked]));
  }

  _sendClose(payload) {
    if (this._closeSent) return;
    this._closeSent = true;
    this._writeFrame(8, payload);
    // The server closes the TCP connection after the closing handshake; wait a while for it.
    this._closeTimer = setTimeout(() => this._socket.destroy(), CLOSE_TIMEOUT_MS);
  }

  _onData(chunk) {
    if (this._failed || this._finished) return;
    this._buffer = this._buffer.length ? Buffer.concat([this._buffer, chunk]) : chunk;
    if (this.readyState === CONNECTING && !this._opening) {
      if (!this._readHandshake()) return;
      this._opening = true;
    }
    while (!this._failed && this._readFrame()) { /* one frame each turn */ }
  }

  _readFrame() {
    const buf = this._buffer;
    if (buf.length < 2) return false;
    const fin = (buf[0] & 0x80) !== 0;
    const rsv = buf[0] & 0x70;
    const opcode = buf[0] & 0x0f;
    const masked = (buf[1] & 0x80) !== 0;
    let length = buf[1] & 0x7f;
    let offset = 2;
    if (length === 126) {
      if (buf.length < 4) return false;
      length = buf.readUInt16BE(2);
      offset = 4;
    } else if (length === 127) {
      if (buf.length < 10) return false;
      const big = buf.readBigUInt64BE(2);
      if (big > BigInt(Number.MAX_SAFE_INTEGER)) return this._fail("frame length out of range"), false;
      length = Number(big);
      offset = 10;
    }
    if (masked) return this._fail("the server masked a frame"), false;
    if (rsv) return this._fail(`reserved bits set (${rsv >> 4}) with no extension`), false;
    if (buf.length < offset + length) return false;
    const payload = buf.subarray(offset, offset + length);
    this._buffer = buf.subarray(offset + length);
    if (opcode >= 8) {
      if (!fin) return this._fail("a fragmented control frame"), false;
      if (length > 125) return this._fail("a control frame longer than 125 bytes"), false;
      if (opcode === 8) return this._onCloseFrame(payload), true;
      if (opcode === 9) {
        hooks.serverPing(this);
        if (!this._closeSent) this._writeFrame(10, Buffer.from(payload));
        return true;
      }
      if (opcode === 10) return true;
      return this._fail(`reserved control opcode ${opcode}`), false;
    }
    if (opcode === 0) {
      if (this._fragments === null) return this._fail("a continuation frame with nothing to continue"), false;
      this._fragments.push(Buffer.from(payload));
    } else if (opcode === 1 || opcode === 2) {
      if (this._fragments !== null) return this._fail("a new message inside a fragmented one"), false;
      this._fragments = [Buffer.from(payload)];
      this._fragmentOpcode = opcode;
    } else {
      return this._fail(`reserved data opcode ${opcode}`), false;
    }
    if (!fin) return true;
    const data = Buffer.concat(this._fragments);
    const kind = this._fragmentOpcode;
    this._fragments = null;
    if (this._closeReceived !== null || this.readyState === CLOSING) return true;  // a browser drops data after closing
    let value;
    if (kind === 1) {
      try {
        value = new TextDecoder("utf-8", { fatal: true }).decode(data);
      } catch {
        return this._fail("invalid UTF-8 in a text frame"), false;
      }
    } else if (this.binaryType === "arraybuffer") {
      value = data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength);
    } else {
      value = new Blob([data]);
    }
    this._queue(makeEvent("message", { data: value, origin: new URL(this.url).origin }));
    return true;
  }

  _onCloseFrame(payload) {
    let code = 1005;
    let reason = "";
    if (payload.length === 1) return this._fail("a close frame of one byte");
    if (payload.length >= 2) {
      code = payload.readUInt16BE(0);
      if (!validCloseCode(code)) return this._fail(`close code ${code} is not allowed on the wire`);
      try {
        reason = new TextDecoder("utf-8", { fatal: true }).decode(payload.subarray(2));
      } catch {
        return this._fail("invalid UTF-8 in the close reason");
      }
    }
    this._closeReceived = { code, reason };
    if (this.readyState === OPEN) this.readyState = CLOSING;
    // Echo the status code (RFC 6455 5.5.1), as browsers do; no status when none came.
    this._sendClose(payload.length >= 2 ? payload.subarray(0, 2) : Buffer.alloc(0));
  }

  // ------------------------------------------------------------------ the end

  _fail(why) {
    if (this._failed || this._finished) return;
    this._failed = true;
    if (why) {
      this._violated = true;
      hooks.violation(this, why);
    }
    this._socket.destroy();
  }

  _onTcpClose() {
    if (this._finished) return;
    this._finished = true;
    clearTimeout(this._closeTimer);
    // As Chrome reports it (WebSocketChannel): the code and reason of the server's close frame
    // when one came, clean only if the TCP connection then ended without error (no reset);
    // 1006 when no close frame came.
    const received = this._closeReceived;
    const clean = received !== null && this._closeSent && this._tcpError === undefined && !this._violated;
    const code = received !== null && !this._violated ? received.code : 1006;
    const reason = received !== null && !this._violated ? received.reason : "";
    const wasOpen = !!this._opening;
    const tcpError = this._tcpError ?? null;
    if (!clean) this._queue(makeEvent("error"), () => { this.readyState = CLOSED; });
    this._queue(makeEvent("close", { code, reason, wasClean: clean }), () => {
      this.readyState = CLOSED;
      hooks.closed(this, { code, reason, wasClean: clean, wasOpen, tcpError });
    });
  }
}

module.exports = { BrowserWebSocket, hooks };
