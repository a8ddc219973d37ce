// peerlink.js: the peerlink client for browsers, one ES module, no dependencies, no build step.
//
// It speaks the peerlink signaling protocol v1 (docs/PROTOCOL.md) over a WebSocket, with a real
// ECDSA P-256 identity from WebCrypto, and sets up direct WebRTC connections to peerlink
// nodes (Rust) and to other browsers with the `rtc/1` negotiation, including identity-bound
// DTLS: every offer and answer carries a signature over its DTLS fingerprint, and every one
// received is verified before it is applied. Rooms it creates or joins speak `room/1` (managed
// rooms' messages, acknowledgements and presence, as the Rust nodes do: `client.room(id)`),
// directly on each connection's `peerlink` channel or signed through the server's relay.
//
//   import { PeerClient } from './peerlink.js';
//   const client = new PeerClient({ url: 'ws://127.0.0.1:8080', alias: 'alice' });
//   await client.connect();
//   const peers = await client.join('lobby');
//   const peer = client.connectToPeer(peers[0].fingerprint);
//   peer.on('connected', () => peer.send({ hello: 'there' }));
//   peer.on('data', (value, channel) => console.log(channel, value));
//   client.on('peer', (incoming) => incoming.on('data', console.log));   // calls to us
//
//   const room = client.room('chat');                  // a managed room (room/1)
//   room.on('message', ({ from, kind, data }) => console.log(from, kind, data));
//   await room.join({ connect: true });
//   room.send({ hello: 'everyone' });

export const PROTOCOL_VERSION = 1;
export const SIGNAL_VERSION = 'rtc/1';
/** The channel every connection has: pre-negotiated, SCTP stream 0, reliable and ordered. */
export const DEFAULT_CHANNEL = 'default';
/** peerlink's own pre-negotiated channels (room messages, transfers): the streams are reserved
 *  so that channels this side opens in band never take their ids; they are not exposed.
 *  `peerlink` carries the rooms' batches (`room/1`); `peerlink-transfer` is not spoken here. */
const RESERVED_CHANNELS = [['peerlink', 2], ['peerlink-transfer', 4]];
const MAX_SDP_LEN = 32 * 1024;
const MAX_CANDIDATE_LEN = 512;
/** Negotiation messages of one remote peer waiting to be handled (the one being handled
 *  included); one more is dropped and reported (`signal_overflow`). */
export const MAX_QUEUED_SIGNALS = 64;
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
 *
 * The remote's negotiation messages (offers, answers, candidates, `bye`, `reject`) are handled
 * one at a time, in the order they arrived: each waits until the one before it is verified and
 * applied (so a polite Rust node's new offer right after its answer is not taken for glare).
 * At most `MAX_QUEUED_SIGNALS` (64) wait per remote; one more is dropped and reported as the
 * client's `error` (code `signal_overflow`, with `from`). A message whose handling fails does
 * not hold up the next.
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
    /** The `peerlink` channel (room batches), while the connection has one. */
    this._roomChannel = null;
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
    // The rooms' direct path follows the connection's state; a lost one to a room member is
    // called again (by the smaller fingerprint).
    this.client._rooms.wake();
    if (state === 'failed' || state === 'closed') this.client._rooms.connectionLost(this.fingerprint);
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
    if (this._roomChannel) {
      this._roomChannel.onclose = null;
      this._roomChannel.onmessage = null;
      this._roomChannel = null;
      this.client._rooms.wake();
    }
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
      if (label === ROOM_CHANNEL) this.#wireRoomChannel(reserved);
      else reserved.onmessage = () => {};
    }
    clearTimeout(this._connectTimer);
    this._connectTimer = setTimeout(() => {
      if (this.state === 'connecting') this.#fail(new PeerlinkError('connect_timeout', 'not connected within the connect timeout'));
    }, this.client.options.connectTimeout ?? 30000);
    return pc;
  }

  /** The `peerlink` channel carries room batches (`room/1`) to the client's rooms. */
  #wireRoomChannel(channel) {
    const rooms = this.client._rooms;
    channel.binaryType = 'arraybuffer';
    channel.bufferedAmountLowThreshold = 64 * 1024;
    this._roomChannel = channel;
    channel.onopen = () => rooms.wake();
    channel.onclose = () => rooms.wake();
    channel.onbufferedamountlow = () => rooms.wake();
    channel.onmessage = (e) => rooms.onDirect(this.fingerprint, e.data);
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

// ---- managed rooms (room/1) -----------------------------------------------------------------
//
// The `room/1` messages of managed rooms (docs/PROTOCOL.md, "Room messages"; the Rust side is
// core/src/room/): batches `{"m":[items]}` on each connection's pre-negotiated `peerlink`
// channel (SCTP stream 2) while it is open, and otherwise as signed relay payloads through the
// server. Every (room, sender, recipient) is a stream with the sender's epoch and sequence
// numbers: delivered in order, once, acknowledged cumulatively, resent on an RTO and on a path
// change. Every room this client creates or joins speaks it (so that the Rust members' messages
// are acknowledged); `PeerClient.room(id)` is the handle to send and to listen.

/** Marks a relay payload as a room batch. */
export const ROOM_VERSION = 'room/1';
/** The label of peerlink's own channel, which carries room batches. */
const ROOM_CHANNEL = 'peerlink';
const ROOM_CONTEXT = 'peerlink room/1';
/** The limits and timers of `room/1`, as the Rust nodes have them (RoomsConfig's defaults). */
export const ROOM_LIMITS = Object.freeze({
  /** Items per batch. */
  maxItems: 1024,
  /** Bytes of a room id. */
  maxRoomId: 128,
  /** Out-of-order messages held per stream. */
  maxReorder: 1024,
  /** Unacknowledged messages per member; a send beyond is refused (`would_block`). */
  maxUnacked: 512,
  /** Largest room message (encoded: JSON text, text with its JSON escaping, binary as base64). */
  maxMessage: 16 * 1024,
  /** Bytes of items per batch on the `peerlink` channel / per relay frame. */
  directBatch: 16 * 1024,
  relayBatch: 24 * 1024,
  /** Bytes of messages per stream in flight by relay. */
  relayWindow: 64 * 1024,
  /** Bytes the `peerlink` channel may hold queued before messages wait. */
  directHighWater: 256 * 1024,
  /** Resend after no acknowledgement for an RTO: 1 s, doubling to 8 s. */
  rto: 1000,
  maxRto: 8000,
  /** Relay frames per second (and burst) for all rooms: below the server's 200/s. */
  relayRate: 100,
  relayBurst: 100,
  /** Presence: least time between updates sent, time to live (refreshed every third of it),
   *  longest time to live accepted, largest state, updates accepted per second per member. */
  presenceInterval: 100,
  presenceTtl: 30000,
  maxPresenceTtl: 300000,
  maxPresence: 1024,
  presenceRxRate: 20,
  /** A connection to a member lost (failed or closed) while both are in a room: the member
   *  with the smaller fingerprint calls again after 2 s, then with backoff up to 60 s. */
  redial: 2000,
  maxRedial: 60000,
});

const BASE64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

function byteLength(text) {
  return utf8.encode(text).length;
}

/** A u64 JavaScript reads exactly (Rust's epochs stay below 2^53 for that reason). */
function isCount(v) {
  return Number.isSafeInteger(v) && v >= 0;
}

function badBatch(reason, message, extra = {}) {
  return new PeerlinkError('bad_room_message', message, { reason, ...extra });
}

function malformedBatch(why) {
  return badBatch('malformed', `malformed room batch: ${why}`);
}

/** Decodes one item as core/src/room/wire.rs does (fields of the wrong type, a room id of 0 or
 *  more than 128 bytes, a data item without exactly one of j, x, b, y or with a sequence number
 *  of 0, bad base64, an unknown type: malformed). `null` counts as absent, as in Rust. */
function decodeRoomItem(w) {
  if (!w || typeof w !== 'object' || Array.isArray(w)) throw malformedBatch('an item is not an object');
  const has = (k) => w[k] !== undefined && w[k] !== null;
  if (typeof w.t !== 'string') throw malformedBatch('an item without a type');
  if (typeof w.r !== 'string') throw malformedBatch('an item without a room');
  const roomLen = byteLength(w.r);
  if (roomLen === 0 || roomLen > ROOM_LIMITS.maxRoomId) throw malformedBatch('room id length');
  if (!isCount(w.e)) throw malformedBatch('an item without an epoch');
  for (const k of ['s', 'v', 'ttl']) if (has(k) && !isCount(w[k])) throw malformedBatch(`\`${k}\` is not a count`);
  for (const k of ['x', 'b', 'y']) if (has(k) && typeof w[k] !== 'string') throw malformedBatch(`\`${k}\` is not a string`);
  const room = w.r;
  const epoch = w.e;
  switch (w.t) {
    case 'd': {
      if (!has('s') || w.s === 0) throw malformedBatch('data without a sequence number');
      const present = ['j', 'x', 'b', 'y'].filter(has);
      if (present.length !== 1) throw malformedBatch('data needs exactly one of j, x, b, y');
      const kind = present[0];
      if ((kind === 'b' || kind === 'y') && !BASE64_RE.test(w[kind])) throw malformedBatch('bad base64');
      return { t: 'd', room, epoch, seq: w.s, kind, value: w[kind] };
    }
    case 'a':
      if (!has('s')) throw malformedBatch('ack without a sequence number');
      return { t: 'a', room, epoch, seq: w.s };
    case 'p': {
      if (!has('v')) throw malformedBatch('presence without a version');
      const ttl = Math.min(has('ttl') ? w.ttl : 30000, ROOM_LIMITS.maxPresenceTtl);
      return { t: 'p', room, epoch, version: w.v, ttl, state: has('st') ? w.st : null };
    }
    default:
      throw malformedBatch(`unknown item type \`${w.t}\``);
  }
}

/** Decodes a batch body (`{"m":[...]}`); one bad item refuses the whole batch. A sealed body
 *  (`{"z":...}`, an end-to-end encrypted room) is refused: the browser does not speak `e2e/1`. */
export function decodeRoomBatch(text) {
  let batch;
  try {
    batch = JSON.parse(text);
  } catch {
    throw malformedBatch('not JSON');
  }
  if (!batch || typeof batch !== 'object' || Array.isArray(batch)) throw malformedBatch('not an object');
  if (typeof batch.z === 'string') throw badBatch('sealed', 'a sealed batch (an end-to-end encrypted room): not supported in the browser');
  if (!Array.isArray(batch.m)) throw malformedBatch('no items');
  if (batch.m.length > ROOM_LIMITS.maxItems) throw badBatch('too_many_items', `a batch carries at most ${ROOM_LIMITS.maxItems} items`);
  return batch.m.map(decodeRoomItem);
}

/** The bytes a relayed batch's signature covers. */
function roomSignedMessage(from, to, body) {
  return utf8.encode(`${ROOM_CONTEXT}\n${from}\n${to}\n${body}`);
}

/** A message's contents as a data item carries them (`"j":…`, `"x":"…"`, `"b":"…"`), encoded
 *  once for every member, with its size against the message limit. */
function roomFragment(kind, data) {
  let fragment;
  let size;
  if (kind === 'json') {
    if (data === undefined || typeof data === 'function' || typeof data === 'symbol') throw new PeerlinkError('serialize', 'the value is not JSON');
    const text = JSON.stringify(data);
    // `"j":null` reads as no `j` at all in Rust (serde's Option): the batch would be refused.
    if (text === undefined || text === 'null') throw new PeerlinkError('serialize', 'null is not a room message (send text or another value)');
    if (text.isWellFormed && !text.isWellFormed()) throw new PeerlinkError('serialize', 'the value holds a lone surrogate');
    fragment = `"j":${text}`;
    size = byteLength(text);
  } else if (kind === 'text') {
    if (typeof data !== 'string') throw new PeerlinkError('serialize', 'text must be a string');
    if (data.isWellFormed && !data.isWellFormed()) throw new PeerlinkError('serialize', 'the text holds a lone surrogate');
    const text = JSON.stringify(data);
    fragment = `"x":${text}`;
    size = byteLength(text);
  } else {
    const bytes = data instanceof ArrayBuffer ? new Uint8Array(data) : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    const b64 = toBase64(bytes);
    fragment = `"b":"${b64}"`;
    size = b64.length;
  }
  return { fragment, size, bytes: byteLength(fragment) };
}

class RoomMember {
  constructor(info, now) {
    this.info = info;
    this.fingerprint = info.fingerprint;
    // Our stream to it.
    this.nextSeq = 1;
    /** [{seq, fragment, bytes, sent, relayBytes}] */
    this.unacked = [];
    this.rto = ROOM_LIMITS.rto;
    this.deadline = null;
    this.blocked = false;
    this.relayInflight = 0;
    // Its stream to us.
    this.inEpoch = null;
    this.inNext = 1;
    this.inBuffer = new Map();
    this.ackDue = false;
    // Its presence, and ours to it.
    this.presence = null;
    this.presenceTokens = [ROOM_LIMITS.presenceRxRate, now];
    this.presenceDue = true;
    this.path = null;
  }

  /** Everything unacknowledged goes again (on whatever path applies then). */
  unsendAll() {
    for (const msg of this.unacked) {
      msg.sent = false;
      msg.relayBytes = 0;
    }
    this.relayInflight = 0;
    this.deadline = null;
  }
}

/**
 * A managed room as this client sees it: `client.room(id)`. Made on first use, before or after
 * joining; rooms the client creates or joins (`createRoom`, `joinRoom`, or `join()` /
 * `create()` here) speak `room/1`.
 *
 *   const room = client.room('chat');
 *   room.on('message', ({ from, kind, data, path }) => ...);   // kind: json | text | binary
 *   await room.join({ connect: true });    // connect: call every member already there
 *   room.send({ hello: 1 }); room.sendText('hi'); room.sendBinary(bytes);  // to every member
 *   room.send(value, { to: fingerprint });                                 // to one
 *   room.setPresence({ typing: true });
 *
 * Connections: `join({ connect: true })` calls every member already there (newcomers call
 * us). When a connection to a member fails or closes while both are in a room (whoever closed
 * it), the member with the smaller fingerprint calls again after 2 s, then with backoff
 * (doubling, up to 60 s) until the direct path is open again or the member is gone; meanwhile
 * messages go by relay.
 *
 * Sends throw a PeerlinkError: `not_joined`, `not_member`, `message_too_large` (over 16 KiB
 * encoded), `serialize`, `would_block` (a member has 512 messages unacknowledged: nothing was
 * sent; `writable` follows when half are acknowledged).
 *
 * Events: `joined` ({owner, maxSize, metadata, members}), `member_joined` (peer), `member_left`
 * (fingerprint, kicked), `message` ({room, from, kind, data, path}): `data` is the parsed JSON
 * value, the string, or a Uint8Array, `path` `direct` or `relay`; `presence` (fingerprint,
 * state), `presence_expired` (fingerprint), `path` (fingerprint, path), `writable`, `closed`,
 * `kicked`. Bad batches (a relay whose signature does not hold, malformed items) are dropped
 * whole and reported as the client's `error` (code `bad_room_message`, with `from`, `reason`).
 * Sync frames (`y`) are acknowledged but not delivered: the browser does not speak `sync/1`.
 */
export class ManagedRoom extends Emitter {
  constructor(layer, id) {
    super();
    this._layer = layer;
    this.id = id;
    this.idJson = JSON.stringify(id);
    this.idBytes = byteLength(this.idJson);
    this.joined = false;
    this.owner = null;
    this.maxSize = null;
    this.metadata = null;
    /** Our streams' epoch in this room. */
    this.epoch = 0;
    /** The other members by fingerprint. */
    this.members = new Map();
    /** Sync frames (`y`) received in order and passed over (acknowledged, not delivered). */
    this.syncFramesIgnored = 0;
    this._presence = { text: null, version: 0, dirty: false, lastSent: null };
  }

  /** Joins the server room (`client.joinRoom`); `connect`: call every member already there. */
  join(options) {
    return this._layer.client.joinRoom(this.id, options);
  }

  /** Creates the server room (`client.createRoom`): `config` is `{max_size, metadata}`. */
  create(config) {
    return this._layer.client.createRoom(this.id, config);
  }

  leave() {
    return this._layer.client.leaveRoom(this.id);
  }

  /** Sends a JSON value (not `null`) to every member, or to `to`. */
  send(value, { to } = {}) {
    this._layer.send(this, 'json', value, to);
  }

  /** Sends a string. */
  sendText(text, { to } = {}) {
    this._layer.send(this, 'text', text, to);
  }

  /** Sends bytes (ArrayBuffer or a typed array). */
  sendBinary(data, { to } = {}) {
    this._layer.send(this, 'binary', data, to);
  }

  /** Sets our presence state (any JSON value of at most 1 KiB; `null` clears it). */
  setPresence(state) {
    this._layer.setPresence(this, state);
  }

  /** A member's presence state (`null`: none). */
  presenceOf(fingerprint) {
    return this.members.get(fingerprint)?.presence?.state ?? null;
  }

  /** The path messages to a member take now (`direct` or `relay`), `null` before any. */
  pathTo(fingerprint) {
    return this.members.get(fingerprint)?.path ?? null;
  }

  /** Messages to a member not yet acknowledged. */
  unacked(fingerprint) {
    return this.members.get(fingerprint)?.unacked.length ?? 0;
  }
}

/** The rooms of one client: streams, acknowledgements, paths, relay pacing and signatures. */
class RoomLayer {
  constructor(client) {
    this.client = client;
    /** ManagedRoom by id. */
    this.rooms = new Map();
    /** Members whose direct path is open, as last seen. */
    this.direct = new Set();
    this.relayTokens = ROOM_LIMITS.relayBurst;
    this.relayAt = null;
    this.relayStarved = false;
    this.lastEpoch = 0;
    this.timer = null;
    this.scheduled = false;
    /** Relay frames go out in order (signing is asynchronous), and are checked in order. */
    this.relayOut = Promise.resolve();
    this.relayIn = Promise.resolve();
    /** Imported sender keys by base64 (bounded). */
    this.keys = new Map();
    /** Members we call again (ours is the smaller fingerprint): fingerprint -> {at, backoff}. */
    this.redial = new Map();
  }

  /** Whether `fp` is a member of a room we are in. */
  #isMember(fp) {
    for (const room of this.rooms.values()) if (room.joined && room.members.has(fp)) return true;
    return false;
  }

  /** The connection to `fp` failed or closed: if it is a member of one of our rooms and ours
   *  is the smaller fingerprint, we call it again after a backoff (2 s, doubling up to 60 s,
   *  until the direct path is open again or it is no longer a member), as the Rust nodes do. */
  connectionLost(fp) {
    if (!this.#isMember(fp) || !(this.client.fingerprint < fp)) return;
    const prev = this.redial.get(fp);
    const backoff = prev ? Math.min(prev.backoff * 2, ROOM_LIMITS.maxRedial) : ROOM_LIMITS.redial;
    this.redial.set(fp, { at: performance.now() + backoff, backoff });
    this.client._log('room: calling', fp.slice(0, 8), 'again in', backoff, 'ms');
    this.wake();
  }

  /** Calls the members whose redial is due (unless a connection to them is up or under way). */
  #redials(now) {
    for (const [fp, r] of [...this.redial]) {
      if (r.at > now) continue;
      const peer = this.client.getPeer(fp);
      if (this.client.registered && (!peer || peer.closed)) {
        this.client._log('room: calling a member again', fp.slice(0, 8));
        try {
          this.client.connectToPeer(fp);
        } catch (e) {
          this.client._log('room: calling again failed', String(e));
        }
      }
      // Checked again then; forgotten when the direct path opens.
      this.redial.set(fp, { at: now + r.backoff, backoff: Math.min(r.backoff * 2, ROOM_LIMITS.maxRedial) });
    }
  }

  /** Forgets the redials of `fps` that are no longer members of any room we are in. */
  #forgetRedials(fps) {
    for (const fp of fps) if (!this.#isMember(fp)) this.redial.delete(fp);
  }

  room(id) {
    let room = this.rooms.get(id);
    if (!room) {
      room = new ManagedRoom(this, id);
      this.rooms.set(id, room);
    }
    return room;
  }

  /** A new stream epoch: the wall clock in ms times 1024, above every one given out before. */
  newEpoch() {
    this.lastEpoch = Math.max(Date.now() * 1024, this.lastEpoch + 1);
    return this.lastEpoch;
  }

  // -- membership --

  /** The create or join request succeeded (again, after a reconnect: new streams). */
  entered(id, reply, { connect = false } = {}) {
    const room = this.room(id);
    const now = performance.now();
    const me = this.client.fingerprint;
    const peers = (reply.peers ?? []).filter((p) => p.fingerprint !== me);
    const rejoined = room.joined;
    room.owner = reply.owner;
    room.maxSize = reply.max_size;
    room.metadata = reply.metadata ?? null;
    room.epoch = this.newEpoch();
    if (rejoined) {
      // The others saw us leave and come back: new streams both ways; what they did not
      // acknowledge goes again under the new epoch, numbered from 1.
      for (const m of room.members.values()) {
        m.inEpoch = null;
        m.inNext = 1;
        m.inBuffer.clear();
        m.ackDue = false;
        m.unsendAll();
        m.unacked.forEach((msg, i) => (msg.seq = i + 1));
        m.nextSeq = m.unacked.length + 1;
        m.presence = null;
        m.presenceDue = true;
      }
      const present = new Set(peers.map((p) => p.fingerprint));
      for (const fp of [...room.members.keys()]) if (!present.has(fp)) this.peerLeft(id, fp, false);
      for (const p of peers) if (!room.members.has(p.fingerprint)) this.peerJoined(id, p);
    } else {
      room.joined = true;
      for (const p of peers) room.members.set(p.fingerprint, new RoomMember(p, now));
      room.emit('joined', { owner: room.owner, maxSize: room.maxSize, metadata: room.metadata, members: peers });
    }
    if (connect) {
      // Whoever joins calls everyone already there.
      for (const p of peers) {
        const existing = this.client.getPeer(p.fingerprint);
        if (!existing || existing.closed) this.client.connectToPeer(p.fingerprint);
      }
    }
    this.wake();
  }

  peerJoined(id, info) {
    const room = this.rooms.get(id);
    if (!room?.joined || info.fingerprint === this.client.fingerprint) return;
    const known = room.members.has(info.fingerprint);
    // Joined again without our hearing it leave: new streams both ways.
    room.members.set(info.fingerprint, new RoomMember(info, performance.now()));
    if (!known) room.emit('member_joined', info);
    this.wake();
  }

  peerLeft(id, fingerprint, kicked) {
    const room = this.rooms.get(id);
    const m = room?.members.get(fingerprint);
    if (!m) return;
    room.members.delete(fingerprint);
    this.#forgetRedials([fingerprint]);
    room.emit('member_left', fingerprint, kicked);
    // Whoever waits for room to send must not wait for a member that is gone.
    if (m.blocked) {
      room.emit('writable');
      this.client.emit('room_writable', room.id);
    }
  }

  /** We are no longer in the room (`closed` or `kicked`): its streams end (the handle and its
   *  listeners stay, for joining again). */
  remove(id, event) {
    const room = this.rooms.get(id);
    if (!room?.joined) return;
    room.joined = false;
    const members = [...room.members.keys()];
    room.members.clear();
    this.#forgetRedials(members);
    room._presence = { text: null, version: 0, dirty: false, lastSent: null };
    room.emit(event);
  }

  /** The signaling connection is back (a resumed session): what goes by relay goes again. */
  relayRestored() {
    for (const room of this.rooms.values()) {
      for (const m of room.members.values()) {
        if (!this.direct.has(m.fingerprint)) {
          m.unsendAll();
          m.ackDue = true;
        }
      }
    }
    this.wake();
  }

  // -- sending --

  send(room, kind, data, to) {
    if (!room.joined) throw new PeerlinkError('not_joined', `not in room \`${room.id}\``);
    const { fragment, size, bytes } = roomFragment(kind, data);
    if (size > ROOM_LIMITS.maxMessage) throw new PeerlinkError('message_too_large', `message of ${size} bytes is over the room limit of ${ROOM_LIMITS.maxMessage}`, { size, max: ROOM_LIMITS.maxMessage });
    let targets;
    if (to !== undefined) {
      if (!room.members.has(to)) throw new PeerlinkError('not_member', `${to} is not a member of the room`);
      targets = [room.members.get(to)];
    } else {
      targets = [...room.members.values()];
    }
    const full = targets.filter((m) => m.unacked.length >= ROOM_LIMITS.maxUnacked);
    if (full.length > 0) {
      for (const m of full) m.blocked = true;
      throw new PeerlinkError('would_block', `${full[0].fingerprint} has too many unacknowledged messages`, { peer: full[0].fingerprint });
    }
    for (const m of targets) m.unacked.push({ seq: m.nextSeq++, fragment, bytes, sent: false, relayBytes: 0 });
    this.wake();
  }

  setPresence(room, state) {
    if (!room.joined) throw new PeerlinkError('not_joined', `not in room \`${room.id}\``);
    const text = state === null || state === undefined ? null : JSON.stringify(state);
    if (text !== null && byteLength(text) > ROOM_LIMITS.maxPresence) {
      throw new PeerlinkError('presence_too_large', `presence state of ${byteLength(text)} bytes is over the limit of ${ROOM_LIMITS.maxPresence}`);
    }
    const p = room._presence;
    if (p.text === text) return;
    p.text = text;
    p.version += 1;
    p.dirty = true;
    this.wake();
  }

  // -- the flush: timers, paths, and what can go now --

  /** Flushes soon (once for everything that happens meanwhile). */
  wake() {
    if (this.scheduled) return;
    this.scheduled = true;
    setTimeout(() => this.flush(), 0);
  }

  #directChannel(fingerprint) {
    const peer = this.client.getPeer(fingerprint);
    const channel = peer?._roomChannel;
    return peer && peer.state === 'connected' && channel?.readyState === 'open' ? channel : null;
  }

  flush() {
    this.scheduled = false;
    clearTimeout(this.timer);
    this.timer = null;
    if (this.rooms.size === 0) return;
    const now = performance.now();
    this.#refill(now);
    this.#timers(now);
    this.#redials(now);
    this.relayStarved = false;
    const peers = new Set();
    for (const room of this.rooms.values()) if (room.joined) for (const fp of room.members.keys()) peers.add(fp);
    for (const fp of [...this.direct]) if (!peers.has(fp)) this.direct.delete(fp);
    for (const fp of peers) {
      const channel = this.#directChannel(fp);
      if (!!channel !== this.direct.has(fp)) {
        // The path changed: everything unacknowledged goes again on the one that applies now.
        if (channel) {
          this.direct.add(fp);
          this.redial.delete(fp);
        } else {
          this.direct.delete(fp);
        }
        for (const room of this.rooms.values()) {
          const m = room.members.get(fp);
          if (!m) continue;
          m.unsendAll();
          m.ackDue = true;
          m.presenceDue = true;
        }
      }
      const relayReady = this.client.registered;
      if (relayReady && this.relayTokens < 1) this.relayStarved = true;
      const { direct, relay } = this.#collect(fp, channel, relayReady && this.relayTokens >= 1, now);
      if (direct.length) this.#sendDirect(fp, channel, direct, now);
      if (relay.length) this.#sendRelay(fp, relay, now);
    }
    this.#arm(now);
  }

  #refill(now) {
    if (this.relayAt !== null) {
      this.relayTokens = Math.min(this.relayTokens + ((now - this.relayAt) / 1000) * ROOM_LIMITS.relayRate, ROOM_LIMITS.relayBurst);
    }
    this.relayAt = now;
  }

  /** RTOs, presence refreshes and expiries that are due. */
  #timers(now) {
    for (const room of this.rooms.values()) {
      if (!room.joined) continue;
      for (const m of room.members.values()) {
        if (m.deadline !== null && m.deadline <= now) {
          this.client._log('room: no acknowledgement from', m.fingerprint.slice(0, 8), 'sending', m.unacked.length, 'again');
          m.unsendAll();
          m.rto = Math.min(m.rto * 2, ROOM_LIMITS.maxRto);
        }
        if (m.presence && m.presence.expires <= now) {
          m.presence = null;
          room.emit('presence_expired', m.fingerprint);
          this.client.emit('room_presence_expired', room.id, m.fingerprint);
        }
      }
      const p = room._presence;
      const maySend = p.lastSent === null || now >= p.lastSent + ROOM_LIMITS.presenceInterval;
      const stale = p.text !== null && p.lastSent !== null && now >= p.lastSent + ROOM_LIMITS.presenceTtl / 3;
      if ((p.dirty && maySend) || stale) {
        p.dirty = false;
        p.lastSent = now;
        for (const m of room.members.values()) m.presenceDue = true;
      }
    }
  }

  /** The next flush without new input. */
  #arm(now) {
    let next = Infinity;
    for (const room of this.rooms.values()) {
      if (!room.joined) continue;
      for (const m of room.members.values()) {
        if (m.deadline !== null) next = Math.min(next, m.deadline);
        if (m.presence) next = Math.min(next, m.presence.expires);
      }
      const p = room._presence;
      if (p.lastSent !== null && p.dirty) next = Math.min(next, p.lastSent + ROOM_LIMITS.presenceInterval);
      else if (p.lastSent !== null && p.text !== null) next = Math.min(next, p.lastSent + ROOM_LIMITS.presenceTtl / 3);
    }
    for (const r of this.redial.values()) next = Math.min(next, r.at);
    if (this.relayStarved) next = Math.min(next, now + ((1 - this.relayTokens) / ROOM_LIMITS.relayRate) * 1000 + 1);
    if (next !== Infinity) this.timer = setTimeout(() => this.flush(), Math.max(0, next - now));
  }

  /** What is due to `fp` and can go now, per path: per room an acknowledgement and presence
   *  first, then unsent messages in order, as much as the path takes now. */
  #collect(fp, channel, relayOk, now) {
    const direct = [];
    const relay = [];
    let directBudget = channel ? Math.max(0, ROOM_LIMITS.directHighWater - channel.bufferedAmount) : 0;
    let relayBudget = relayOk ? Math.min(Math.floor(this.relayTokens), 8) * ROOM_LIMITS.relayBatch : 0;
    for (const room of this.rooms.values()) {
      const m = room.joined ? room.members.get(fp) : null;
      if (!m) continue;
      const path = channel ? 'direct' : 'relay';
      if (m.path !== path) {
        if (m.path !== null || path === 'direct') {
          room.emit('path', fp, path);
          this.client.emit('room_path', room.id, fp, path);
        }
        m.path = path;
      }
      const control = channel ? direct : relayOk ? relay : null;
      if (control) {
        if (m.ackDue && m.inEpoch !== null) {
          m.ackDue = false;
          const text = `{"t":"a","r":${room.idJson},"e":${m.inEpoch},"s":${m.inNext - 1}}`;
          control.push({ text, bytes: byteLength(text), origin: { kind: 'ack', room } });
        }
        const p = room._presence;
        if (m.presenceDue && p.lastSent !== null) {
          m.presenceDue = false;
          const text = `{"t":"p","r":${room.idJson},"e":${room.epoch},"v":${p.version},"ttl":${ROOM_LIMITS.presenceTtl},"st":${p.text ?? 'null'}}`;
          control.push({ text, bytes: byteLength(text), origin: { kind: 'presence', room } });
        }
      }
      let window = Math.max(0, ROOM_LIMITS.relayWindow - m.relayInflight);
      for (const msg of m.unacked) {
        if (msg.sent) continue;
        const head = `{"t":"d","r":${room.idJson},"e":${room.epoch},"s":${msg.seq},`;
        const len = head.length - room.idJson.length + room.idBytes + msg.bytes + 1;
        // In order per stream: once one message has to wait, the rest wait too. A stream with
        // nothing in flight by relay may always send one.
        const fits = channel ? directBudget >= len : relayBudget >= len && (len <= window || window === ROOM_LIMITS.relayWindow);
        if (!fits) break;
        if (channel) directBudget -= len;
        else {
          relayBudget -= len;
          window = Math.max(0, window - len);
        }
        (channel ? direct : relay).push({ text: `${head}${msg.fragment}}`, bytes: len, origin: { kind: 'data', room, m, msg } });
      }
    }
    return { direct, relay };
  }

  /** Splits items into batches: at most `limit` bytes of items and 1024 items each; with
   *  `controlFirst`, control items lead in a batch of their own. */
  #batches(items, limit, controlFirst) {
    const out = [];
    let i = 0;
    let first = true;
    while (i < items.length) {
      const control = first && controlFirst && items[0].origin.kind !== 'data';
      first = false;
      const batch = [];
      let bytes = 0;
      while (i < items.length) {
        const item = items[i];
        if (control && item.origin.kind === 'data') break;
        if (batch.length > 0 && (bytes + item.bytes > limit || batch.length >= ROOM_LIMITS.maxItems)) break;
        bytes += item.bytes;
        batch.push(item);
        i += 1;
      }
      out.push(batch);
    }
    return out;
  }

  static body(batch) {
    return `{"m":[${batch.map((x) => x.text).join(',')}]}`;
  }

  /** Items to `fp` that did not go: control items are due again, messages stay unsent. */
  #requeue(fp, items) {
    for (const { origin } of items) {
      if (origin.kind === 'data') {
        const { m, msg } = origin;
        if (msg.sent && m.unacked.includes(msg)) {
          m.relayInflight = Math.max(0, m.relayInflight - msg.relayBytes);
          msg.sent = false;
          msg.relayBytes = 0;
        }
        continue;
      }
      const m = origin.room.members.get(fp);
      if (m && origin.kind === 'ack') m.ackDue = true;
      else if (m) m.presenceDue = true;
    }
  }

  #markSent(fp, batch, now, relay) {
    for (const { origin, bytes } of batch) {
      if (origin.kind !== 'data') continue;
      const { m, msg } = origin;
      msg.sent = true;
      if (relay) {
        msg.relayBytes = bytes;
        m.relayInflight += bytes;
      }
      // The direct path is reliable while it lasts (a path change sends everything again):
      // its RTO is only a safety net.
      if (m.deadline === null) m.deadline = now + (relay ? m.rto : ROOM_LIMITS.maxRto);
    }
  }

  #sendDirect(fp, channel, items, now) {
    const batches = this.#batches(items, ROOM_LIMITS.directBatch, true);
    for (let k = 0; k < batches.length; k++) {
      try {
        channel.send(RoomLayer.body(batches[k]));
      } catch (e) {
        this.client._log('room: direct send failed', String(e));
        this.#requeue(fp, batches.slice(k).flat());
        return;
      }
      this.#markSent(fp, batches[k], now, false);
    }
  }

  #sendRelay(fp, items, now) {
    const batches = this.#batches(items, ROOM_LIMITS.relayBatch, false);
    for (let k = 0; k < batches.length; k++) {
      if (!this.client.registered || this.relayTokens < 1) {
        if (this.client.registered) this.relayStarved = true;
        this.#requeue(fp, batches.slice(k).flat());
        return;
      }
      this.relayTokens -= 1;
      const batch = batches[k];
      this.#markSent(fp, batch, now, true);
      const body = RoomLayer.body(batch);
      const client = this.client;
      this.relayOut = this.relayOut.then(async () => {
        try {
          const me = client.identity;
          const sig = await me.sign(roomSignedMessage(me.fingerprint, fp, body));
          client.relay(fp, { peerlink: ROOM_VERSION, key: me.publicKey, sig: toBase64(sig), to: fp, body });
        } catch (e) {
          client._log('room: relay not sent', String(e));
          this.#requeue(fp, batch);
          this.wake();
        }
      }).catch((e) => console.error('peerlink: room relay failed', e));
    }
  }

  // -- receiving --

  /** A text message on a connection's `peerlink` channel. */
  onDirect(from, data) {
    if (typeof data !== 'string') {
      this.#bad(from, 'direct', malformedBatch('binary on the room channel'));
      return;
    }
    let items;
    try {
      items = decodeRoomBatch(data);
    } catch (e) {
      this.#bad(from, 'direct', e);
      return;
    }
    this.#handleItems(from, items, 'direct');
  }

  /** A relay payload marked `room/1`: checked (in arrival order), then its items handled. */
  onRelay(from, payload) {
    this.relayIn = this.relayIn.then(async () => {
      let items;
      try {
        const body = await this.#openRelayed(from, payload);
        items = decodeRoomBatch(body);
      } catch (e) {
        this.#bad(from, 'relay', e);
        return;
      }
      this.#handleItems(from, items, 'relay');
    }).catch((e) => console.error('peerlink: room relay handling failed', e));
    return this.relayIn;
  }

  /** The key must be the sender's (its fingerprint is the relay's `from`), the batch addressed
   *  to us, and the signature must cover sender, recipient and body. */
  async #openRelayed(from, payload) {
    const me = this.client.fingerprint;
    const { key, sig, to, body } = payload;
    if (typeof key !== 'string' || typeof sig !== 'string' || typeof to !== 'string' || typeof body !== 'string') {
      throw malformedBatch('a relayed batch needs key, sig, to and body');
    }
    if (to.toLowerCase() !== me) throw badBatch('bad_signature', 'the batch is not signed by its sender for us: addressed to another peer', { detail: 'addressed to another peer' });
    let imported = this.keys.get(key);
    if (!imported) {
      try {
        imported = await importPublicKey(key);
      } catch {
        throw badBatch('bad_signature', 'the batch is not signed by its sender for us: malformed key', { detail: 'malformed key' });
      }
      if (this.keys.size >= 256) this.keys.clear();
      this.keys.set(key, imported);
    }
    if (imported.fingerprint !== from) throw badBatch('bad_signature', "the batch is not signed by its sender for us: the key is not the sender's", { detail: 'wrong key' });
    let sigBytes;
    try {
      sigBytes = fromBase64(sig);
    } catch {
      sigBytes = null;
    }
    if (!sigBytes || sigBytes.length !== 64) throw badBatch('bad_signature', 'the batch is not signed by its sender for us: malformed signature', { detail: 'malformed signature' });
    const ok = await crypto.subtle.verify(ECDSA_SHA256, imported.key, sigBytes, roomSignedMessage(from, me, body));
    if (!ok) throw badBatch('bad_signature', 'the batch is not signed by its sender for us: signature does not verify', { detail: 'signature does not verify' });
    return body;
  }

  #bad(from, path, error) {
    const e = error instanceof PeerlinkError ? error : malformedBatch(String(error));
    e.from = from;
    e.path = path;
    e.message = `bad room message from ${from}: ${e.message}`;
    this.client._log(e.message);
    this.client.emit('error', e);
  }

  #handleItems(from, items, path) {
    const now = performance.now();
    for (const item of items) {
      const room = this.rooms.get(item.room);
      // A room we are not in, or a sender that is not (yet) a member: ignored, not
      // acknowledged (it comes again).
      if (!room?.joined) continue;
      const m = room.members.get(from);
      if (!m) continue;
      if (item.t === 'd') {
        if (m.inEpoch !== null && item.epoch < m.inEpoch) continue;
        if (m.inEpoch !== item.epoch) {
          m.inEpoch = item.epoch;
          m.inNext = 1;
          m.inBuffer.clear();
        }
        m.ackDue = true;
        if (item.seq < m.inNext) continue;
        if (item.seq > m.inNext) {
          if (m.inBuffer.size < ROOM_LIMITS.maxReorder && item.seq - m.inNext <= ROOM_LIMITS.maxReorder) m.inBuffer.set(item.seq, item);
          continue;
        }
        this.#deliver(room, from, item, path);
        m.inNext += 1;
        for (let next = m.inBuffer.get(m.inNext); next; next = m.inBuffer.get(m.inNext)) {
          m.inBuffer.delete(m.inNext);
          this.#deliver(room, from, next, path);
          m.inNext += 1;
        }
      } else if (item.t === 'a') {
        if (item.epoch !== room.epoch) continue;
        const before = m.unacked.length;
        while (m.unacked.length > 0 && m.unacked[0].seq <= item.seq) {
          const msg = m.unacked.shift();
          m.relayInflight = Math.max(0, m.relayInflight - msg.relayBytes);
        }
        if (m.unacked.length < before) {
          m.rto = ROOM_LIMITS.rto;
          m.deadline = m.unacked.some((x) => x.sent) ? now + m.rto : null;
          if (m.blocked && m.unacked.length <= ROOM_LIMITS.maxUnacked / 2) {
            m.blocked = false;
            room.emit('writable');
            this.client.emit('room_writable', room.id);
          }
        }
      } else {
        this.#presence(room, m, item, now);
      }
    }
    this.wake();
  }

  #presence(room, m, item, now) {
    // The member's own rate, enforced here too.
    let [tokens, at] = m.presenceTokens;
    tokens = Math.min(tokens + ((now - at) / 1000) * ROOM_LIMITS.presenceRxRate, ROOM_LIMITS.presenceRxRate);
    if (tokens < 1) {
      m.presenceTokens = [tokens, now];
      return;
    }
    m.presenceTokens = [tokens - 1, now];
    const expires = now + item.ttl;
    const p = m.presence;
    if (p && item.epoch < p.epoch) return;
    const fresh = !p || p.epoch !== item.epoch || item.version > p.version;
    if (!fresh) {
      if (item.version === p.version) p.expires = expires;
      return;
    }
    const text = item.state === null ? null : JSON.stringify(item.state);
    if (text !== null && byteLength(text) > ROOM_LIMITS.maxPresence) {
      this.#bad(m.fingerprint, m.path ?? 'relay', malformedBatch('presence state over the size limit'));
      return;
    }
    const changed = !p || p.text !== text;
    m.presence = { epoch: item.epoch, version: item.version, state: item.state, text, expires };
    if (changed) {
      room.emit('presence', m.fingerprint, item.state);
      this.client.emit('room_presence', room.id, m.fingerprint, item.state);
    }
  }

  #deliver(room, from, item, path) {
    let kind;
    let data;
    switch (item.kind) {
      case 'j':
        kind = 'json';
        data = item.value;
        break;
      case 'x':
        kind = 'text';
        data = item.value;
        break;
      case 'b':
        kind = 'binary';
        data = fromBase64(item.value);
        break;
      default:
        // A sync frame (`sync/1`): not spoken here; acknowledged, not delivered.
        room.syncFramesIgnored += 1;
        return;
    }
    const msg = { room: room.id, from, kind, data, path };
    room.emit('message', msg);
    this.client.emit('room_message', room.id, msg);
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
 * `room_closed` (roomId), `kicked` (roomId), `peer` (an incoming Peer), `error` (PeerlinkError;
 * `bad_room_message` for a refused room batch, `bad_signal` for a malformed negotiation
 * message, `signal_overflow` for one dropped because 64 of its sender's wait, see `Peer`);
 * and of the managed rooms (also on each
 * `ManagedRoom`): `room_message` (roomId, {room, from, kind, data, path}), `room_presence`
 * (roomId, fingerprint, state), `room_presence_expired` (roomId, fingerprint), `room_path`
 * (roomId, fingerprint, path), `room_writable` (roomId).
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
    /** The managed rooms (`room/1`): see `room(id)`. */
    this._rooms = new RoomLayer(this);
    this.serverId = null;
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map();
    this._stopped = false;
    this._attempts = 0;
    this._pingTimer = null;
    this._reconnectTimer = null;
    this._connectWaiters = [];
    /** Each remote peer's negotiation messages, handled one after the other:
     *  fingerprint -> {tail (a promise that never rejects), queued}. */
    this._signals = new Map();
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
        this._rooms.peerJoined(frame.room_id, frame.peer);
        this.emit('room_peer_joined', frame.room_id, frame.peer);
        return;
      case 'room_peer_left':
        this._rooms.peerLeft(frame.room_id, frame.fingerprint, !!frame.kicked);
        this.emit('room_peer_left', frame.room_id, frame.fingerprint, frame.kicked);
        return;
      case 'room_closed':
        this.rooms.delete(frame.room_id);
        this._rooms.remove(frame.room_id, 'closed');
        this.emit('room_closed', frame.room_id);
        return;
      case 'kicked':
        this.rooms.delete(frame.room_id);
        this._rooms.remove(frame.room_id, 'kicked');
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
    } else {
      this._rooms.relayRestored();
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
   *  metadata}`. Resolves with the `room_created` reply. The room speaks `room/1`: see
   *  `room(id)`. */
  async createRoom(roomId, config) {
    const reply = await this.request('create_room', config ? { room_id: roomId, config } : { room_id: roomId });
    this.rooms.add(roomId);
    this._rooms.entered(roomId, reply);
    return reply;
  }

  /** Joins a room; resolves with the `room_joined` reply (its `peers` are the members). The
   *  room speaks `room/1` (see `room(id)`); `{connect: true}` calls every member already there
   *  (as a Rust node joining a managed room does), so that room messages go direct. */
  async joinRoom(roomId, options = {}) {
    const reply = await this.request('join_room', { room_id: roomId });
    this.rooms.add(roomId);
    this._rooms.entered(roomId, reply, options);
    return reply;
  }

  async leaveRoom(roomId) {
    this.rooms.delete(roomId);
    this._rooms.remove(roomId, 'closed');
    await this.request('leave_room', { room_id: roomId });
  }

  /** The managed room `roomId` (`room/1`: messages, acknowledgements, presence), made on first
   *  use; see `ManagedRoom`. */
  room(roomId) {
    return this._rooms.room(roomId);
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
    this._rooms.remove(roomId, 'closed');
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
    if (marker === ROOM_VERSION) {
      await this._rooms.onRelay(from, payload);
      return;
    }
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
    await this.#queueSignal(from, msg);
  }

  /** Handles `msg` once every earlier negotiation message of `from` has been handled:
   *  verifying and applying a description are asynchronous, and a message looked at before the
   *  one ahead of it is done sees a state that is about to change (an offer that follows an
   *  answer would be taken for glare and dropped). A failure in one does not hold up the next. */
  #queueSignal(from, msg) {
    let queue = this._signals.get(from);
    if (!queue) {
      queue = { tail: Promise.resolve(), queued: 0 };
      this._signals.set(from, queue);
    }
    if (queue.queued >= MAX_QUEUED_SIGNALS) {
      this.emit('error', new PeerlinkError('signal_overflow', `${MAX_QUEUED_SIGNALS} negotiation messages from ${from} are waiting: a ${msg.t} was dropped`, { from }));
      return queue.tail;
    }
    queue.queued += 1;
    queue.tail = queue.tail
      .then(() => this.#onSignal(from, msg))
      .catch((e) => this._log('negotiation message failed', from.slice(0, 8), msg.t, String(e)))
      .finally(() => {
        queue.queued -= 1;
        if (queue.queued === 0 && this._signals.get(from) === queue) this._signals.delete(from);
      });
    return queue.tail;
  }

  async #onSignal(from, msg) {
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
