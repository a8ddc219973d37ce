// peerlink.js: the peerlink client for browsers, one ES module, no dependencies, no build step.
//
// It speaks the peerlink signaling protocol v1 (docs/PROTOCOL.md) over a WebSocket, with a real
// ECDSA P-256 identity from WebCrypto, and sets up direct WebRTC connections to peerlink
// nodes (Rust) and to other browsers with the `rtc/1` negotiation, including identity-bound
// DTLS: every offer and answer carries a signature over its DTLS fingerprint, and every one
// received is verified before it is applied.
//
//   import { PeerClient } from './peerlink.js';
//   const client = new PeerClient({ url: 'ws://127.0.0.1:8080', alias: 'alice' });
//   await client.connect();
//   const peers = await client.join('lobby');
//   const peer = client.connectToPeer(peers[0].fingerprint);
//   peer.on('connected', () => peer.send({ hello: 'there' }));
//   peer.on('data', (value, channel) => console.log(channel, value));
//   client.on('peer', (incoming) => incoming.on('data', console.log));   // calls to us

export const PROTOCOL_VERSION = 1;
export const SIGNAL_VERSION = 'rtc/1';
/** The channel every connection has: pre-negotiated, SCTP stream 0, reliable and ordered. */
export const DEFAULT_CHANNEL = 'default';
/** peerlink's own pre-negotiated channels (room messages, transfers): the streams are reserved
 *  so that channels this side opens in band never take their ids; they are not exposed. */
const RESERVED_CHANNELS = [['peerlink', 2], ['peerlink-transfer', 4]];
const MAX_SDP_LEN = 32 * 1024;
const MAX_CANDIDATE_LEN = 512;
const REGISTER_CONTEXT = 'peerlink-register-v1';
const DTLS_CONTEXT = 'peerlink-dtls-v1';

const utf8 = new TextEncoder();

// ---- bytes -------------------------------------------------------------------------------

/** Base64 (standard alphabet, padded) of bytes. */
export function toBase64(bytes) {
  let s = '';
  const b = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  for (let i = 0; i < b.length; i += 0x8000) s += String.fromCharCode(...b.subarray(i, i + 0x8000));
  return btoa(s);
}

/** Bytes of base64; throws on bad input. */
export function fromBase64(text) {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

/** Lowercase hex of bytes. */
export function toHex(bytes) {
  return Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, '0')).join('');
}

function randomHex(n) {
  return toHex(crypto.getRandomValues(new Uint8Array(n)));
}

async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
}

// ---- events ------------------------------------------------------------------------------

/** A small event emitter: `on` returns a function that removes the handler. */
export class Emitter {
  #handlers = new Map();

  on(event, fn) {
    if (!this.#handlers.has(event)) this.#handlers.set(event, new Set());
    this.#handlers.get(event).add(fn);
    return () => this.off(event, fn);
  }

  once(event, fn) {
    const off = this.on(event, (...args) => {
      off();
      fn(...args);
    });
    return off;
  }

  off(event, fn) {
    this.#handlers.get(event)?.delete(fn);
  }

  emit(event, ...args) {
    for (const fn of [...(this.#handlers.get(event) ?? [])]) {
      try {
        fn(...args);
      } catch (e) {
        console.error(`peerlink: a '${event}' handler threw`, e);
      }
    }
  }
}

/** An error with a machine-readable `code` (the protocol's error codes, `identity_mismatch`,
 *  `rejected`, `connect_timeout`, `closed`, ...) and, for identity errors, a `reason`. */
export class PeerlinkError extends Error {
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'PeerlinkError';
    this.code = code;
    Object.assign(this, extra);
  }
}

// ---- identity ----------------------------------------------------------------------------

const ECDSA = { name: 'ECDSA', namedCurve: 'P-256' };
const ECDSA_SHA256 = { name: 'ECDSA', hash: 'SHA-256' };

/** An ECDSA P-256 identity. Its fingerprint is the SHA-256 of the 65-byte SEC1 public key, in
 *  64 lowercase hex digits, exactly as the server and the Rust nodes print it. */
export class Identity {
  constructor(privateKey, publicKeyRaw, fingerprint) {
    this.privateKey = privateKey;
    /** The 65-byte uncompressed SEC1 public key. */
    this.publicKeyRaw = publicKeyRaw;
    /** Base64 of the public key, as `register` and `rtc/1` carry it. */
    this.publicKey = toBase64(publicKeyRaw);
    this.fingerprint = fingerprint;
  }

  /** A fresh identity (extractable, so that it can be exported). */
  static async generate() {
    const pair = await crypto.subtle.generateKey(ECDSA, true, ['sign', 'verify']);
    const raw = new Uint8Array(await crypto.subtle.exportKey('raw', pair.publicKey));
    return new Identity(pair.privateKey, raw, toHex(await sha256(raw)));
  }

  /** Restores `{publicKey, privateKey, fingerprint}` (base64 SEC1, base64 PKCS#8, hex), the
   *  format of `export()` and of the Rust `Identity::export`; refuses parts that disagree. */
  static async restore(keys) {
    const privateKey = await crypto.subtle.importKey('pkcs8', fromBase64(keys.privateKey), ECDSA, true, ['sign']);
    const jwk = await crypto.subtle.exportKey('jwk', privateKey);
    const raw = new Uint8Array(65);
    raw[0] = 4;
    raw.set(base64UrlDecode(jwk.x), 1);
    raw.set(base64UrlDecode(jwk.y), 33);
    if (toBase64(raw) !== keys.publicKey) throw new PeerlinkError('key_mismatch', 'the public key does not match the private key');
    const fingerprint = toHex(await sha256(raw));
    if (keys.fingerprint !== fingerprint) throw new PeerlinkError('fingerprint_mismatch', `fingerprint ${keys.fingerprint} is not the key's (${fingerprint})`);
    return new Identity(privateKey, raw, fingerprint);
  }

  /** `{publicKey, privateKey, fingerprint}`; treat it as a secret. */
  async export() {
    const der = new Uint8Array(await crypto.subtle.exportKey('pkcs8', this.privateKey));
    return { publicKey: this.publicKey, privateKey: toBase64(der), fingerprint: this.fingerprint };
  }

  /** The 64-byte r||s ECDSA P-256/SHA-256 signature of `message` (a string is signed as UTF-8). */
  async sign(message) {
    const data = typeof message === 'string' ? utf8.encode(message) : message;
    return new Uint8Array(await crypto.subtle.sign(ECDSA_SHA256, this.privateKey, data));
  }
}

function base64UrlDecode(s) {
  const b64 = s.replace(/-/g, '+').replace(/_/g, '/');
  return fromBase64(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
}

/** Imports a base64 SEC1 public key; returns `{key, fingerprint}` (the fingerprint of its
 *  uncompressed form). Throws on a malformed key. */
export async function importPublicKey(base64) {
  const key = await crypto.subtle.importKey('raw', fromBase64(base64), ECDSA, true, ['verify']);
  const raw = new Uint8Array(await crypto.subtle.exportKey('raw', key));
  return { key, fingerprint: toHex(await sha256(raw)) };
}

// ---- identity-bound DTLS -----------------------------------------------------------------

/** The DTLS fingerprint an SDP declares, in the canonical form both sides sign
 *  (`sha-256 AB:CD:...`, hex upper case), if every `a=fingerprint:` line names the same
 *  certificate; `null` otherwise (none, several, or unreadable). */
export function sdpFingerprint(sdp) {
  let found = null;
  for (const line of sdp.split('\n')) {
    const l = line.replace(/\r$/, '');
    if (!l.startsWith('a=fingerprint:')) continue;
    const value = l.slice('a=fingerprint:'.length).trim();
    const space = value.indexOf(' ');
    if (space < 0) return null;
    const hash = value.slice(0, space);
    const parts = value.slice(space + 1).split(':');
    if (!parts.every((p) => /^[0-9a-fA-F]{1,2}$/.test(p))) return null;
    const canonical = `${hash} ${parts.map((p) => p.padStart(2, '0').toUpperCase()).join(':')}`;
    if (found !== null && found !== canonical) return null;
    found = canonical;
  }
  return found;
}

function dtlsMessage(kind, sid, signer, recipient, dtlsFingerprint) {
  return `${DTLS_CONTEXT}\n${kind}\n${sid}\n${signer}\n${recipient}\n${dtlsFingerprint}`;
}

/** Checks a received offer or answer: `key` must hash to `expected`, the SDP must carry one
 *  DTLS fingerprint, and `sig` must verify over it for `me`. Returns `null` when it holds, or
 *  the reason it does not: `wrong_key`, `no_fingerprint`, `malformed` or `bad_signature`. */
export async function verifyDescription({ expected, me, kind, sid, sdp, key, sig }) {
  let imported;
  let sigBytes;
  try {
    imported = await importPublicKey(key);
    sigBytes = fromBase64(sig);
  } catch {
    return 'malformed';
  }
  if (imported.fingerprint !== expected) return 'wrong_key';
  const dtls = sdpFingerprint(sdp);
  if (dtls === null) return 'no_fingerprint';
  if (sigBytes.length !== 64) return 'malformed';
  const ok = await crypto.subtle.verify(ECDSA_SHA256, imported.key, sigBytes, utf8.encode(dtlsMessage(kind, sid, expected, me, dtls)));
  return ok ? null : 'bad_signature';
}

// ---- a direct connection ------------------------------------------------------------------

/**
 * One direct WebRTC connection to another peer, negotiated with `rtc/1` through the server's
 * relay. Made by `PeerClient.connectToPeer` (we offer) or handed out by the client's `peer`
 * event (they offered).
 *
 * Events: `state` (state), `connected` (the default channel is open), `disconnected`,
 * `data` (value, channel, {binary, text}): text is parsed as JSON when it is JSON, binary
 * arrives as a Uint8Array; `datachannel:open` (label), `datachannel:close` (label),
 * `error` (PeerlinkError), `closed`, `track` (track, stream, transceiver): a remote audio or
 * video track (`stream` is its MediaStream, from the offer's `msid`; a track the remote muted
 * fires `mute` on the MediaStreamTrack, and `unmute` once media flows again).
 * States: `connecting`, `connected`, `disconnected`, `failed`, `closed`.
 *
 * Media: `addTrack(track, stream)` and `removeTrack(sender)` renegotiate the connection (an
 * offer for the same session, signed and verified like the first); re-offers from the remote
 * are verified and answered. When both sides offer at once, the polite side (the lower
 * fingerprint) rolls its offer back, answers, and offers again (perfect negotiation).
 */
export class Peer extends Emitter {
  constructor(client, fingerprint) {
    super();
    this.client = client;
    /** The remote's fingerprint. */
    this.fingerprint = fingerprint;
    /** Whether this side gives way in glare (the lower fingerprint does). */
    this.polite = client.fingerprint < fingerprint;
    this.state = 'connecting';
    this.pc = null;
    this.channels = new Map();
    this._restartTimer = null;
    this._connectTimer = null;
    this.#resetSession(null, false);
  }

  /** Forgets the session's negotiation state for session `sid`. */
  #resetSession(sid, offerer) {
    /** The session id (32 hex digits). */
    this.sid = sid;
    /** Whether this side made the session's first offer. */
    this.offerer = offerer;
    this.everConnected = false;
    this._pendingOffer = false;
    this._descriptionSent = false;
    this._localCandidates = [];
    this._remoteCandidates = [];
    this._restarts = 0;
    this._dtlsError = null;
    this._makingOffer = false;
  }

  /** Labels of the open channels (the default channel first). */
  get channelLabels() {
    return [...this.channels.values()].filter((c) => c.readyState === 'open').map((c) => c.label);
  }

  get closed() {
    return this.state === 'closed' || this.state === 'failed';
  }

  /** The largest message the connection carries (the remote's SCTP max-message-size). */
  get maxMessageSize() {
    return this.pc?.sctp?.maxMessageSize ?? 65536;
  }

  /** Sends a value as JSON text (any JSON value, strings included) on `channel`. */
  send(value, channel = DEFAULT_CHANNEL) {
    const text = JSON.stringify(value);
    this.#channelFor(channel, utf8.encode(text).length).send(text);
  }

  /** Sends a string as is (a text message). */
  sendText(text, channel = DEFAULT_CHANNEL) {
    this.#channelFor(channel, utf8.encode(text).length).send(text);
  }

  /** Sends bytes (ArrayBuffer, typed array or Blob-free view) as a binary message. */
  sendBinary(data, channel = DEFAULT_CHANNEL) {
    const bytes = data instanceof ArrayBuffer ? new Uint8Array(data) : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    this.#channelFor(channel, bytes.byteLength).send(bytes);
  }

  /** Bytes queued on `channel` and not yet sent. */
  bufferedAmount(channel = DEFAULT_CHANNEL) {
    return this.channels.get(channel)?.bufferedAmount ?? 0;
  }

  /** Opens a named channel in band (the remote learns its label): `{ordered, maxRetransmits,
   *  maxPacketLifeTime, protocol}`. Returns the RTCDataChannel. */
  createDataChannel(label, options = {}) {
    if (!this.pc) throw new PeerlinkError('not_connected', 'no connection yet');
    if (!label || label === DEFAULT_CHANNEL || RESERVED_CHANNELS.some(([l]) => l === label)) {
      throw new PeerlinkError('invalid_channel', `\`${label}\` cannot be opened`);
    }
    if (this.channels.has(label)) throw new PeerlinkError('channel_exists', `channel \`${label}\` exists`);
    const channel = this.pc.createDataChannel(label, options);
    this.#wireChannel(channel);
    return channel;
  }

  /** The channel called `label`, if any. */
  getChannel(label) {
    return this.channels.get(label);
  }

  /** Sends a local audio or video track (a MediaStreamTrack, e.g. from getUserMedia) in
   *  `stream` (its MediaStream: the remote sees the tracks of one stream together); the
   *  connection renegotiates. Returns the RTCRtpSender (for `removeTrack`). */
  addTrack(track, stream) {
    if (!this.pc || this.closed) throw new PeerlinkError('not_connected', 'no connection yet');
    // A new send-only m-line per track, as the Rust nodes make theirs (`pc.addTrack` would
    // reuse the transceiver of a remote track of the same kind, sending on the remote's
    // send-only m-line, which peerlink's media model has no place for).
    return this.pc.addTransceiver(track, { direction: 'sendonly', streams: stream ? [stream] : [] }).sender;
  }

  /** Stops sending a track added with `addTrack` (its sender): its m-line is stopped (port 0)
   *  and the connection renegotiates. */
  removeTrack(sender) {
    if (!this.pc || this.closed) throw new PeerlinkError('not_connected', 'no connection yet');
    const transceiver = this.pc.getTransceivers().find((t) => t.sender === sender);
    if (transceiver) transceiver.stop();
    else this.pc.removeTrack(sender);
  }

  /** The RTCRtpSenders of this side's tracks. */
  get senders() {
    return this.pc ? this.pc.getSenders().filter((s) => s.track) : [];
  }

  /** The remote's live tracks. */
  get remoteTracks() {
    return this.pc ? this.pc.getReceivers().map((r) => r.track).filter((t) => t && t.readyState === 'live') : [];
  }

  /** Restarts ICE: an offer with new credentials for the same session. */
  async restartIce() {
    if (!this.pc || this.closed || this._pendingOffer) return;
    this.client._log('restarting ICE', this.fingerprint);
    this._pendingOffer = true;
    try {
      const offer = await this.pc.createOffer({ iceRestart: true });
      await this.pc.setLocalDescription(offer);
      await this.#sendDescription('offer');
    } catch (e) {
      this._pendingOffer = false;
      this.client._log('ICE restart failed', String(e));
    }
  }

  /** Closes the connection: tells the remote (`bye`) and closes the RTCPeerConnection. */
  close() {
    if (this.closed) return;
    if (this.sid) this.client._relaySignal(this.fingerprint, { t: 'bye', sid: this.sid });
    this.#teardown();
    this.#setState('closed');
    this.emit('closed');
  }

  // -- internals --

  #channelFor(label, size) {
    const channel = this.channels.get(label);
    if (!channel) throw new PeerlinkError('unknown_channel', `no channel \`${label}\``);
    if (channel.readyState !== 'open') throw new PeerlinkError('channel_not_open', `channel \`${label}\` is not open`);
    if (size > this.maxMessageSize) throw new PeerlinkError('message_too_large', `message of ${size} bytes is over the ${this.maxMessageSize}-byte limit`);
    return channel;
  }

  #setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.emit('state', state);
  }

  #fail(error) {
    if (this.closed) return;
    this.client._log('connection failed', this.fingerprint.slice(0, 8), error.code, error.message);
    this.#teardown();
    this.emit('error', error);
    this.client.emit('error', error);
    this.#setState('failed');
  }

  #teardown() {
    clearTimeout(this._restartTimer);
    clearTimeout(this._connectTimer);
    if (this.pc) {
      for (const channel of this.channels.values()) channel.onclose = null;
      for (const channel of this.channels.values()) {
        if (channel.readyState === 'open') this.emit('datachannel:close', channel.label);
      }
      this.pc.onicecandidate = null;
      this.pc.onconnectionstatechange = null;
      this.pc.ondatachannel = null;
      this.pc.close();
    }
    this.pc = null;
    this.channels.clear();
  }

  #newConnection(sid, offerer) {
    this.#teardown();
    this.#resetSession(sid, offerer);
    this.#setState('connecting');
    const pc = new RTCPeerConnection({ iceServers: this.client.options.iceServers ?? [] });
    this.pc = pc;
    pc.onicecandidate = (e) => {
      const line = e.candidate?.candidate;
      // The end of candidates (null or empty) is not signalled.
      if (!line || line.length > MAX_CANDIDATE_LEN) return;
      if (this._descriptionSent) this.client._relaySignal(this.fingerprint, { t: 'candidate', sid: this.sid, candidate: line });
      else this._localCandidates.push(line);
    };
    pc.onconnectionstatechange = () => this.#onConnectionState(pc.connectionState);
    pc.ondatachannel = (e) => this.#wireChannel(e.channel);
    pc.ontrack = (e) => {
      this.client._log('remote track', e.track.kind, e.track.id, e.streams[0]?.id ?? '-');
      this.emit('track', e.track, e.streams[0] ?? null, e.transceiver);
    };
    pc.onnegotiationneeded = () => this.#renegotiate(pc);
    // The pre-negotiated channels: `default` on stream 0; peerlink's own streams reserved.
    this.#wireChannel(pc.createDataChannel(DEFAULT_CHANNEL, { negotiated: true, id: 0 }));
    for (const [label, id] of RESERVED_CHANNELS) {
      const reserved = pc.createDataChannel(label, { negotiated: true, id });
      reserved.onmessage = () => {};
    }
    clearTimeout(this._connectTimer);
    this._connectTimer = setTimeout(() => {
      if (this.state === 'connecting') this.#fail(new PeerlinkError('connect_timeout', 'not connected within the connect timeout'));
    }, this.client.options.connectTimeout ?? 30000);
    return pc;
  }

  #wireChannel(channel) {
    channel.binaryType = 'arraybuffer';
    this.channels.set(channel.label, channel);
    channel.onopen = () => {
      this.emit('datachannel:open', channel.label);
      if (channel.label === DEFAULT_CHANNEL) {
        this.everConnected = true;
        this.#setState('connected');
        this.emit('connected');
      }
    };
    channel.onclose = () => {
      if (this.channels.get(channel.label) === channel) this.channels.delete(channel.label);
      this.emit('datachannel:close', channel.label);
    };
    channel.onmessage = (e) => {
      if (typeof e.data === 'string') {
        let value = e.data;
        try {
          value = JSON.parse(e.data);
        } catch {
          // Not JSON: the text itself.
        }
        this.emit('data', value, channel.label, { binary: false, text: e.data });
      } else {
        this.emit('data', new Uint8Array(e.data), channel.label, { binary: true });
      }
    };
    if (channel.readyState === 'open') channel.onopen();
  }

  /** Keeps the DTLS transport's error (the alert sent or received), for the failure report. */
  #watchDtls(pc) {
    const dtls = pc.sctp?.transport;
    if (!dtls || dtls.onerror) return;
    dtls.onerror = (e) => {
      const err = e.error ?? {};
      const alerts = [err.sentAlert != null ? `sent alert ${err.sentAlert}` : null, err.receivedAlert != null ? `received alert ${err.receivedAlert}` : null].filter(Boolean);
      this._dtlsError = `DTLS failed (${[err.errorDetail ?? err.message ?? 'error', ...alerts].join(', ')})`;
    };
  }

  #onConnectionState(state) {
    if (this.closed) return;
    if (state === 'connected') {
      this._restarts = 0;
      clearTimeout(this._restartTimer);
      if (this.everConnected) this.#setState('connected');
    } else if (state === 'disconnected') {
      this.#setState('disconnected');
      this.emit('disconnected', state);
      // The impolite side restarts ICE after 0.5 s, then with backoff (as the Rust nodes do).
      if (!this.polite) this.#scheduleRestart(500);
    } else if (state === 'failed') {
      // The DTLS transport reports its error right after the connection state: let it.
      setTimeout(() => {
        const dtls = this.pc?.sctp?.transport;
        const ice = this.pc?.iceConnectionState;
        const dtlsFailed = dtls?.state === 'failed' || ice === 'connected' || ice === 'completed';
        const why = this._dtlsError ?? (dtlsFailed ? `DTLS failed (ICE ${ice})` : `ICE ${ice}`);
        this.#fail(new PeerlinkError('failed', `the connection failed: ${why}`));
      }, 0);
    }
  }

  #scheduleRestart(delay) {
    clearTimeout(this._restartTimer);
    this._restartTimer = setTimeout(async () => {
      if (this.state !== 'disconnected') return;
      await this.restartIce();
      this._restarts += 1;
      this.#scheduleRestart(1000 * 2 ** Math.min(this._restarts, 4));
    }, delay);
  }

  /** A renegotiation (tracks added or removed): an offer for the same session. Only once the
   *  first exchange is done and nothing is in flight; otherwise the browser fires
   *  `negotiationneeded` again when the connection is back to stable. */
  async #renegotiate(pc) {
    if (this.pc !== pc || this.closed || this._makingOffer || this._pendingOffer) return;
    if (pc.signalingState !== 'stable' || !pc.remoteDescription || !pc.localDescription) return;
    this.client._log('renegotiating with', this.fingerprint.slice(0, 8));
    this._makingOffer = true;
    this._pendingOffer = true;
    try {
      await pc.setLocalDescription(await pc.createOffer());
      if (this.pc !== pc) return;
      await this.#sendDescription('offer');
    } catch (e) {
      this._pendingOffer = false;
      this.client._log('renegotiation failed', String(e));
    } finally {
      this._makingOffer = false;
    }
  }

  /** Starts a fresh session by offering. */
  async _offer() {
    const pc = this.#newConnection(randomHex(16), true);
    this._pendingOffer = true;
    try {
      const offer = await pc.createOffer();
      if (this.pc !== pc) return;
      await pc.setLocalDescription(offer);
      if (this.pc !== pc) return;
      await this.#sendDescription('offer');
    } catch (e) {
      this.#fail(new PeerlinkError('bad_description', `could not make an offer: ${e}`));
    }
  }

  async #sendDescription(kind) {
    const pc = this.pc;
    const sdp = pc.localDescription.sdp;
    const hooks = this.client.options.hooks ?? {};
    const signer = hooks.signer ?? this.client.identity;
    let dtls = sdpFingerprint(sdp);
    if (hooks.beforeSign) dtls = hooks.beforeSign(dtls, kind);
    const sig = await signer.sign(dtlsMessage(kind, this.sid, signer.fingerprint, this.fingerprint, dtls));
    if (this.pc !== pc) return;
    this.client._relaySignal(this.fingerprint, { t: kind, sid: this.sid, sdp, key: signer.publicKey, sig: toBase64(sig) });
    this._descriptionSent = true;
    for (const line of this._localCandidates.splice(0)) {
      this.client._relaySignal(this.fingerprint, { t: 'candidate', sid: this.sid, candidate: line });
    }
  }

  /** Verifies a received description; on failure refuses it (`reject`, `identity_mismatch`). */
  async #verify(kind, msg) {
    const client = this.client;
    const hooks = client.options.hooks ?? {};
    const expected = hooks.expectedFingerprint ? hooks.expectedFingerprint(this.fingerprint) : this.fingerprint;
    const reason = await verifyDescription({ expected, me: client.fingerprint, kind, sid: msg.sid, sdp: msg.sdp, key: msg.key, sig: msg.sig });
    if (reason === null) return true;
    client._relaySignal(this.fingerprint, { t: 'reject', sid: msg.sid, reason: 'identity_mismatch' });
    this.#fail(new PeerlinkError('identity_mismatch', `identity mismatch (${reason}): the ${kind} was not signed by ${expected}`, { reason }));
    return false;
  }

  /** Answers an offer that starts a new session (ours is replaced, if any); `onVerified` runs
   *  once the offer's identity binding holds. */
  async _answerNew(msg, onVerified) {
    // Verify before anything is set up: a refused description leaves no connection.
    this.sid = msg.sid;
    this.offerer = false;
    this.#teardown();
    this.#setState('connecting');
    if (!(await this.#verify('offer', msg))) return;
    onVerified?.();
    const pc = this.#newConnection(msg.sid, false);
    await this.#applyOffer(pc, msg);
  }

  async #applyOffer(pc, msg) {
    try {
      await pc.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
      this._pendingOffer = false;
      this.#watchDtls(pc);
      await this.#flushRemoteCandidates(pc);
      const answer = await pc.createAnswer();
      if (this.pc !== pc) return;
      await pc.setLocalDescription(answer);
      if (this.pc !== pc) return;
      await this.#sendDescription('answer');
    } catch (e) {
      if (this.pc !== pc) return;
      this.client._relaySignal(this.fingerprint, { t: 'reject', sid: msg.sid, reason: 'bad_description' });
      this.#fail(new PeerlinkError('bad_description', `the offer could not be used: ${e}`));
    }
  }

  async #flushRemoteCandidates(pc) {
    for (const line of this._remoteCandidates.splice(0)) await this.#addCandidate(pc, line);
  }

  async #addCandidate(pc, line) {
    const mid = /(?:^|\n)a=mid:([^\r\n]+)/.exec(pc.remoteDescription?.sdp ?? '')?.[1] ?? '0';
    try {
      await pc.addIceCandidate({ candidate: line, sdpMid: mid, sdpMLineIndex: 0 });
    } catch (e) {
      this.client._log('remote candidate refused', line, String(e));
    }
  }

  /** A negotiation message for this peer's session. */
  async _onSignal(msg) {
    if (this.closed || msg.sid !== this.sid) return;
    const pc = this.pc;
    switch (msg.t) {
      case 'offer': {
        // A renegotiation or ICE restart of this session.
        if (!pc) return;
        const glare = this._makingOffer || pc.signalingState !== 'stable';
        if (glare && !this.polite) {
          this.client._log('glare: keeping our offer to', this.fingerprint.slice(0, 8));
          return; // ours stands: the polite remote rolls back and answers it
        }
        if (!(await this.#verify('offer', msg))) return;
        if (this.pc !== pc) return;
        if (pc.signalingState === 'have-local-offer') {
          // Glare on the polite side: ours is rolled back (negotiationneeded offers it again).
          this.client._log('glare: rolling back our offer to', this.fingerprint.slice(0, 8));
          try {
            await pc.setLocalDescription({ type: 'rollback' });
          } catch (e) {
            this.client._log('rollback failed', String(e));
          }
          this._pendingOffer = false;
        }
        await this.#applyOffer(pc, msg);
        break;
      }
      case 'answer': {
        if (!pc || pc.signalingState !== 'have-local-offer') return;
        if (!(await this.#verify('answer', msg))) return;
        try {
          await pc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
          this._pendingOffer = false;
          this.#watchDtls(pc);
          await this.#flushRemoteCandidates(pc);
        } catch (e) {
          this.client._relaySignal(this.fingerprint, { t: 'reject', sid: msg.sid, reason: 'bad_description' });
          this.#fail(new PeerlinkError('bad_description', `the answer could not be used: ${e}`));
        }
        break;
      }
      case 'candidate':
        if (!pc) return;
        if (pc.remoteDescription) await this.#addCandidate(pc, msg.candidate);
        else this._remoteCandidates.push(msg.candidate);
        break;
      case 'bye':
        this.client._log('closed by the peer', this.fingerprint.slice(0, 8));
        this.#teardown();
        this.#setState('closed');
        this.emit('closed');
        break;
      case 'reject': {
        const code = msg.reason === 'identity_mismatch' ? 'identity_mismatch' : 'rejected';
        this.#fail(new PeerlinkError(code, `the peer refused the connection: ${msg.reason}`, { reason: msg.reason, remote: true }));
        break;
      }
    }
  }
}

// ---- the signaling client -----------------------------------------------------------------

/**
 * The signaling client: one WebSocket to a peerlink server, a verified identity, requests
 * with replies, namespaces, relay, rooms, and the direct connections (`Peer`) it negotiates.
 *
 * Options: `url` (default: the page's own host), `alias`, `meta`, `token`, `identity` (an
 * `Identity`) or `identityKeys` (exported keys), `iceServers`, `autoReconnect` (true),
 * `reconnectDelay` (1000 ms), `reconnectMaxDelay` (30000 ms), `maxReconnectAttempts`
 * (Infinity), `pingInterval` (25000 ms), `requestTimeout` (10000 ms), `connectTimeout` (30000
 * ms, per direct connection), `acceptIncoming` (true), `serverId` (refuse other servers),
 * `log` (a function given debug lines), and `hooks` (tests of the identity binding only:
 * `signer`, `beforeSign(dtls, kind)`, `expectedFingerprint(from)`, `onRemoteDescription(msg)`).
 *
 * Events: `connected`, `disconnected` (code), `registered` ({fingerprint, alias, resumed}),
 * `reconnecting` (attempt), `peer_list` (namespace, peers), `peer_joined` (namespace, peer),
 * `peer_left` (namespace, fingerprint), `relay` (from, payload), `broadcast` (from, namespace,
 * payload), `room_peer_joined` (roomId, peer), `room_peer_left` (roomId, fingerprint, kicked),
 * `room_closed` (roomId), `kicked` (roomId), `peer` (an incoming Peer), `error` (PeerlinkError).
 */
export class PeerClient extends Emitter {
  constructor(options = {}) {
    super();
    this.options = {
      autoReconnect: true,
      reconnectDelay: 1000,
      reconnectMaxDelay: 30000,
      maxReconnectAttempts: Infinity,
      pingInterval: 25000,
      requestTimeout: 10000,
      acceptIncoming: true,
      ...options,
    };
    this.url = this.options.url ?? `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}`;
    this.alias = this.options.alias ?? '';
    this.identity = this.options.identity ?? null;
    this.fingerprint = this.identity?.fingerprint ?? null;
    this.registered = false;
    /** Direct connections by remote fingerprint. */
    this.peers = new Map();
    this.namespaces = new Set();
    this.rooms = new Set();
    this.serverId = null;
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map();
    this._stopped = false;
    this._attempts = 0;
    this._pingTimer = null;
    this._reconnectTimer = null;
    this._connectWaiters = [];
  }

  _log(...args) {
    this.options.log?.(args.map(String).join(' '));
  }

  /** Connects and registers; resolves with the fingerprint once registered. */
  async connect() {
    if (!this.identity) {
      this.identity = this.options.identityKeys ? await Identity.restore(this.options.identityKeys) : await Identity.generate();
    }
    this.fingerprint = this.identity.fingerprint;
    this._stopped = false;
    if (this.registered) return this.fingerprint;
    const done = new Promise((resolve, reject) => this._connectWaiters.push({ resolve, reject }));
    if (!this._ws) this.#open();
    return done;
  }

  /** Says `bye` and closes; no reconnect. Every direct connection is closed too. */
  disconnect() {
    this._stopped = true;
    clearTimeout(this._reconnectTimer);
    for (const peer of this.peers.values()) peer.close();
    const ws = this._ws;
    this._ws = null;
    if (ws?.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: 'bye' }));
    ws?.close(1000);
    this.#down(1000);
  }

  #open() {
    this._log('connecting to', this.url);
    const ws = new WebSocket(this.url);
    this._ws = ws;
    ws.onopen = () => this.emit('connected');
    ws.onmessage = (e) => {
      if (typeof e.data !== 'string') return;
      let frame;
      try {
        frame = JSON.parse(e.data);
      } catch {
        return;
      }
      this.#onFrame(frame).catch((err) => {
        console.error('peerlink: frame handling failed', err);
        this.emit('error', err instanceof PeerlinkError ? err : new PeerlinkError('internal', String(err)));
      });
    };
    ws.onclose = (e) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this.#down(e.code);
    };
    ws.onerror = () => {};
  }

  #down(code) {
    const was = this.registered;
    this.registered = false;
    clearInterval(this._pingTimer);
    for (const { reject, timer } of this._pending.values()) {
      clearTimeout(timer);
      reject(new PeerlinkError('disconnected', 'the signaling connection closed'));
    }
    this._pending.clear();
    if (was || code !== undefined) this.emit('disconnected', code);
    const final = this._stopped || code === 1000 || code === 4002 || !this.options.autoReconnect;
    if (final || this._attempts >= this.options.maxReconnectAttempts) {
      for (const w of this._connectWaiters.splice(0)) w.reject(new PeerlinkError('disconnected', `the signaling connection closed (${code})`));
      return;
    }
    this._attempts += 1;
    const base = Math.min(this.options.reconnectDelay * 2 ** (this._attempts - 1), this.options.reconnectMaxDelay);
    const delay = base * (0.8 + Math.random() * 0.2);
    this.emit('reconnecting', this._attempts);
    this._reconnectTimer = setTimeout(() => this.#open(), delay);
  }

  async #onFrame(frame) {
    switch (frame.type) {
      case 'challenge':
        return this.#register(frame);
      case 'registered':
        return this.#onRegistered(frame);
      case 'error':
        if (frame.id !== undefined && this.#settle(frame.id, null, frame)) return;
        this.emit('error', new PeerlinkError(frame.code, frame.message));
        return;
      case 'relay':
        return this.#onRelay(frame.from, frame.payload);
      case 'broadcast':
        this.emit('broadcast', frame.from, frame.namespace, frame.payload);
        return;
      case 'peer_joined':
        this.emit('peer_joined', frame.namespace, frame.peer);
        return;
      case 'peer_left':
        this.emit('peer_left', frame.namespace, frame.fingerprint);
        return;
      case 'room_peer_joined':
        this.emit('room_peer_joined', frame.room_id, frame.peer);
        return;
      case 'room_peer_left':
        this.emit('room_peer_left', frame.room_id, frame.fingerprint, frame.kicked);
        return;
      case 'room_closed':
        this.rooms.delete(frame.room_id);
        this.emit('room_closed', frame.room_id);
        return;
      case 'kicked':
        this.rooms.delete(frame.room_id);
        this.emit('kicked', frame.room_id);
        return;
      default:
        if (frame.id !== undefined) this.#settle(frame.id, frame, null);
    }
  }

  async #register(challenge) {
    if (challenge.version !== PROTOCOL_VERSION) {
      this.emit('error', new PeerlinkError('unsupported_version', `the server speaks version ${challenge.version}`));
      this._stopped = true;
      this._ws?.close(1000);
      return;
    }
    if (this.options.serverId && challenge.server_id !== this.options.serverId) {
      this.emit('error', new PeerlinkError('wrong_server', `server id ${challenge.server_id}, expected ${this.options.serverId}`));
      this._stopped = true;
      this._ws?.close(1000);
      return;
    }
    this.serverId = challenge.server_id;
    const signature = await this.identity.sign(`${REGISTER_CONTEXT}\n${challenge.server_id}\n${challenge.nonce}`);
    // Not a tracked request: `registered` and its errors are handled on their own.
    this._registerId = this._nextId++;
    const frame = { type: 'register', id: this._registerId, version: PROTOCOL_VERSION, public_key: this.identity.publicKey, signature: toBase64(signature) };
    if (this.alias) frame.alias = this.alias;
    if (this.options.meta) frame.meta = this.options.meta;
    if (this.options.token) frame.token = this.options.token;
    this.#sendFrame(frame);
  }

  async #onRegistered(frame) {
    if (frame.fingerprint !== this.fingerprint) {
      this.emit('error', new PeerlinkError('wrong_fingerprint', `the server registered ${frame.fingerprint}, not us`));
      this._stopped = true;
      this._ws?.close(1000);
      return;
    }
    this.registered = true;
    this._attempts = 0;
    clearInterval(this._pingTimer);
    this._pingTimer = setInterval(() => this.request('ping').catch(() => {}), this.options.pingInterval);
    const rejoin = !frame.resumed || (frame.missed ?? 0) > 0;
    this.emit('registered', { fingerprint: frame.fingerprint, alias: frame.alias, resumed: !!frame.resumed });
    for (const w of this._connectWaiters.splice(0)) w.resolve(this.fingerprint);
    if (rejoin) {
      for (const ns of this.namespaces) this.join(ns).catch((e) => this.emit('error', e));
      for (const room of this.rooms) this.joinRoom(room).catch((e) => this.emit('error', e));
    }
  }

  #settle(id, reply, error) {
    if (id === this._registerId && error) {
      this.emit('error', new PeerlinkError(error.code, error.message));
      return true;
    }
    const pending = this._pending.get(id);
    if (!pending) return false;
    this._pending.delete(id);
    clearTimeout(pending.timer);
    if (error) pending.reject(new PeerlinkError(error.code, error.message));
    else pending.resolve(reply);
    return true;
  }

  #sendFrame(frame) {
    if (this._ws?.readyState !== WebSocket.OPEN) throw new PeerlinkError('not_connected', 'not connected to the server');
    this._ws.send(JSON.stringify(frame));
  }

  /** Sends a request frame of `type` with `fields`; resolves with the reply frame, rejects
   *  with a PeerlinkError carrying the server's error code. */
  request(type, fields = {}) {
    if (!this.registered) return Promise.reject(new PeerlinkError('not_registered', 'not registered'));
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new PeerlinkError('timeout', `no reply to ${type} within ${this.options.requestTimeout} ms`));
      }, this.options.requestTimeout);
      this._pending.set(id, { resolve, reject, timer });
      try {
        this.#sendFrame({ type, id, ...fields });
      } catch (e) {
        clearTimeout(timer);
        this._pending.delete(id);
        reject(e);
      }
    });
  }

  /** Joins a namespace; resolves with the other members (and emits `peer_list`). */
  async join(namespace, appType, appVersion) {
    const fields = { namespace };
    if (appType) fields.app_type = appType;
    if (appVersion) fields.app_version = appVersion;
    const reply = await this.request('join', fields);
    this.namespaces.add(namespace);
    this.emit('peer_list', namespace, reply.peers);
    return reply.peers;
  }

  async leave(namespace) {
    this.namespaces.delete(namespace);
    await this.request('leave', { namespace });
  }

  /** Lists members of a namespace without joining it. */
  async discover(namespace, limit) {
    return (await this.request('discover', limit ? { namespace, limit } : { namespace })).peers;
  }

  /** Waits for a group of `groupSize` with equal `criteria`; resolves with `{namespace,
   *  session_id, peers}`. */
  async match(namespace, criteria, groupSize = 2) {
    const reply = await this.request('match', { namespace, criteria, group_size: groupSize });
    return { namespace: reply.namespace, session_id: reply.session_id, peers: reply.peers };
  }

  /** Relays any JSON value to a peer through the server (fire and forget; failures come as
   *  `error` events). */
  relay(to, payload) {
    this.#sendFrame({ type: 'relay', to, payload });
  }

  /** Broadcasts to the other members of a namespace this client is in. */
  broadcast(namespace, payload) {
    this.#sendFrame({ type: 'broadcast', namespace, payload });
  }

  /** Creates a room (this client owns it and is its first member): `config` is `{max_size,
   *  metadata}`. Resolves with the `room_created` reply. */
  async createRoom(roomId, config) {
    const reply = await this.request('create_room', config ? { room_id: roomId, config } : { room_id: roomId });
    this.rooms.add(roomId);
    return reply;
  }

  /** Joins a room; resolves with the `room_joined` reply (its `peers` are the members). */
  async joinRoom(roomId) {
    const reply = await this.request('join_room', { room_id: roomId });
    this.rooms.add(roomId);
    return reply;
  }

  async leaveRoom(roomId) {
    this.rooms.delete(roomId);
    await this.request('leave_room', { room_id: roomId });
  }

  roomInfo(roomId) {
    return this.request('room_info', { room_id: roomId });
  }

  /** Rooms that are not full, by id prefix. */
  async listRooms(prefix, limit) {
    const fields = {};
    if (prefix !== undefined) fields.prefix = prefix;
    if (limit !== undefined) fields.limit = limit;
    return (await this.request('list_rooms', fields)).rooms;
  }

  async kick(roomId, fingerprint) {
    await this.request('kick', { room_id: roomId, fingerprint });
  }

  async closeRoom(roomId) {
    this.rooms.delete(roomId);
    await this.request('close_room', { room_id: roomId });
  }

  /** Starts (or returns) the direct connection to `fingerprint`: an offer goes out now. */
  connectToPeer(fingerprint) {
    if (!this.registered) throw new PeerlinkError('not_registered', 'not registered');
    if (fingerprint === this.fingerprint) throw new PeerlinkError('self_connect', 'cannot connect to ourselves');
    const existing = this.peers.get(fingerprint);
    if (existing && !existing.closed) return existing;
    const peer = existing ?? new Peer(this, fingerprint);
    this.peers.set(fingerprint, peer);
    peer._offer();
    return peer;
  }

  /** The connection to `fingerprint`, if any. */
  getPeer(fingerprint) {
    return this.peers.get(fingerprint);
  }

  _relaySignal(to, fields) {
    try {
      this.relay(to, { peerlink: SIGNAL_VERSION, ...fields });
    } catch (e) {
      this._log('negotiation message not sent', String(e));
    }
  }

  async #onRelay(from, payload) {
    const marker = payload && typeof payload === 'object' && !Array.isArray(payload) ? payload.peerlink : undefined;
    if (marker !== SIGNAL_VERSION) {
      this.emit('relay', from, payload);
      return;
    }
    const hooks = this.options.hooks ?? {};
    let msg = payload;
    if (typeof msg.sid !== 'string' || !/^[0-9a-fA-F]{32}$/.test(msg.sid) || typeof msg.t !== 'string') {
      this.emit('error', new PeerlinkError('bad_signal', `malformed negotiation message from ${from}`));
      return;
    }
    if (msg.t === 'offer' || msg.t === 'answer') {
      if (typeof msg.sdp !== 'string' || typeof msg.key !== 'string' || typeof msg.sig !== 'string' || msg.sdp.length > MAX_SDP_LEN) {
        this.emit('error', new PeerlinkError('bad_signal', `malformed ${msg.t} from ${from}`));
        return;
      }
      if (hooks.onRemoteDescription) msg = hooks.onRemoteDescription({ ...msg });
    }
    if (msg.t === 'candidate' && (typeof msg.candidate !== 'string' || msg.candidate.length > MAX_CANDIDATE_LEN)) return;
    const existing = this.peers.get(from);
    const live = existing && !existing.closed ? existing : null;
    if (msg.t !== 'offer') {
      if (live) await live._onSignal(msg);
      return;
    }
    if (live && live.sid === msg.sid) {
      await live._onSignal(msg);
      return;
    }
    if (live) {
      if (live._pendingOffer && !live.everConnected && !live.polite) {
        this._log('glare: keeping our offer to', from.slice(0, 8));
        return;
      }
      // Glare on the polite side, or the remote started over: answer its new session.
      await live._answerNew(msg);
      return;
    }
    if (!this.options.acceptIncoming) {
      this._relaySignal(from, { t: 'reject', sid: msg.sid, reason: 'refused' });
      return;
    }
    const peer = existing ?? new Peer(this, from);
    this.peers.set(from, peer);
    await peer._answerNew(msg, () => this.emit('peer', peer));
  }
}
