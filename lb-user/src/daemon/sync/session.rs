//! The sync link's session layer: a handshake and sealed frames over one TCP connection,
//! from the node that sends its state (the dialer) to the node that installs it (the
//! listener).
//!
//! - Handshake: the dialer sends `MAGIC`, `VERSION` and a fresh 16-byte nonce; the listener
//!   answers with the same header and a nonce of its own. The session key is
//!   HMAC-SHA256(shared key, both nonces), so it is new for every connection: frames
//!   recorded from another session, or sent by anyone without the shared key, fail to open.
//! - Frames: a 4-byte big-endian length, then the body sealed with ChaCha20-Poly1305 under
//!   the session key, the frame's number in the session as nonce and the length as
//!   associated data. A frame replayed, reordered, dropped, truncated or altered within a
//!   session fails to open: the listener counts it and closes the connection.
use anyhow::{bail, Context, Result};
use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    ChaCha20Poly1305, Key, Nonce,
};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const MAGIC: [u8; 4] = *b"LBSY";
/// Bumped on any change of the handshake, the framing or the records.
pub const VERSION: u16 = 1;
const NONCE_BYTES: usize = 16;
const HELLO_BYTES: usize = MAGIC.len() + 2 + NONCE_BYTES;
/// The largest sealed frame either side sends or accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// The shared key's length (hex-encoded in `daemon.sync.key_file`).
pub const KEY_BYTES: usize = 32;
const TAG_BYTES: usize = 16;

/// What a listener refuses, each counted separately (`lb status`, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a sync hello, a length out of bounds, or a connection cut mid-frame.
    Malformed,
    /// A sync hello of another version.
    WrongVersion,
    /// A frame that does not open under the session key: forged, replayed, altered, or
    /// sealed with another shared key.
    Unauthenticated,
}

#[derive(Debug)]
pub struct Refused(pub Refusal, pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.0, self.1)
    }
}

impl std::error::Error for Refused {}

fn refused<T>(kind: Refusal, why: impl Into<String>) -> Result<T> {
    Err(Refused(kind, why.into()).into())
}

/// The key every node of the group shares.
#[derive(Clone)]
pub struct SharedKey([u8; KEY_BYTES]);

impl SharedKey {
    /// Parses the key file's contents: 64 hex digits, surrounding whitespace ignored.
    pub fn parse(text: &str) -> Result<Self> {
        let bytes = hex::decode(text.trim()).context("not hexadecimal")?;
        let key: [u8; KEY_BYTES] = bytes.try_into().map_err(|b: Vec<u8>| {
            anyhow::anyhow!("{} bytes, need {KEY_BYTES} (64 hex digits)", b.len())
        })?;
        Ok(Self(key))
    }

    fn session(&self, dialer: &[u8; NONCE_BYTES], listener: &[u8; NONCE_BYTES]) -> Sealer {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"lb sync session");
        mac.update(dialer);
        mac.update(listener);
        let key = mac.finalize().into_bytes();
        Sealer {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
            frames: 0,
        }
    }
}

fn hello(nonce: &[u8; NONCE_BYTES]) -> [u8; HELLO_BYTES] {
    let mut bytes = [0; HELLO_BYTES];
    bytes[..4].copy_from_slice(&MAGIC);
    bytes[4..6].copy_from_slice(&VERSION.to_be_bytes());
    bytes[6..].copy_from_slice(nonce);
    bytes
}

async fn read_hello(stream: &mut (impl AsyncRead + Unpin)) -> Result<[u8; NONCE_BYTES]> {
    let mut bytes = [0; HELLO_BYTES];
    if stream.read_exact(&mut bytes).await.is_err() {
        return refused(Refusal::Malformed, "short hello");
    }
    if bytes[..4] != MAGIC {
        return refused(Refusal::Malformed, "not a sync hello");
    }
    let version = u16::from_be_bytes([bytes[4], bytes[5]]);
    if version != VERSION {
        return refused(
            Refusal::WrongVersion,
            format!("version {version}, this node speaks {VERSION}"),
        );
    }
    Ok(bytes[6..].try_into().expect("hello layout"))
}

fn fresh_nonce() -> Result<[u8; NONCE_BYTES]> {
    let mut nonce = [0; NONCE_BYTES];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("random nonce: {e}"))?;
    Ok(nonce)
}

/// Seals (dialer) or opens (listener) the frames of one session, numbering them.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
    frames: u64,
}

impl Sealer {
    fn nonce(&mut self) -> Nonce {
        let mut nonce = [0; 12];
        nonce[4..].copy_from_slice(&self.frames.to_be_bytes());
        self.frames += 1;
        *Nonce::from_slice(&nonce)
    }

    pub async fn send(
        &mut self,
        stream: &mut (impl AsyncWrite + Unpin),
        body: &[u8],
    ) -> Result<()> {
        let length = body.len() + TAG_BYTES;
        if length > MAX_FRAME {
            bail!("frame of {length} bytes exceeds {MAX_FRAME}");
        }
        let header = (length as u32).to_be_bytes();
        let nonce = self.nonce();
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: body,
                    aad: &header,
                },
            )
            .map_err(|_| anyhow::anyhow!("sealing a frame"))?;
        stream.write_all(&header).await?;
        stream.write_all(&sealed).await?;
        Ok(())
    }

    /// The next frame's body; None when the dialer closed the connection between frames.
    pub async fn receive(
        &mut self,
        stream: &mut (impl AsyncRead + Unpin),
    ) -> Result<Option<Vec<u8>>> {
        let mut header = [0; 4];
        match stream.read(&mut header[..1]).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        if stream.read_exact(&mut header[1..]).await.is_err() {
            return refused(Refusal::Malformed, "cut in a frame header");
        }
        let length = u32::from_be_bytes(header) as usize;
        if !(TAG_BYTES..=MAX_FRAME).contains(&length) {
            return refused(Refusal::Malformed, format!("frame length {length}"));
        }
        let mut sealed = vec![0; length];
        if stream.read_exact(&mut sealed).await.is_err() {
            return refused(Refusal::Malformed, "cut in a frame");
        }
        let nonce = self.nonce();
        match self.cipher.decrypt(
            &nonce,
            Payload {
                msg: &sealed,
                aad: &header,
            },
        ) {
            Ok(body) => Ok(Some(body)),
            Err(_) => refused(Refusal::Unauthenticated, "frame does not authenticate"),
        }
    }
}

/// Bytes a body of `body_len` takes on the link: length header, ciphertext, tag.
pub fn sealed_size(body_len: usize) -> usize {
    4 + body_len + TAG_BYTES
}

/// The dialer's side of the handshake: returns the sealer for its frames.
pub async fn dial(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    key: &SharedKey,
) -> Result<Sealer> {
    let ours = fresh_nonce()?;
    stream.write_all(&hello(&ours)).await?;
    let theirs = read_hello(stream).await?;
    Ok(key.session(&ours, &theirs))
}

/// The listener's side of the handshake: returns the opener of the dialer's frames.
pub async fn accept(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    key: &SharedKey,
) -> Result<Sealer> {
    let theirs = read_hello(stream).await?;
    let ours = fresh_nonce()?;
    stream.write_all(&hello(&ours)).await?;
    Ok(key.session(&theirs, &ours))
}

/// The refusal behind an error of `accept` or `Sealer::receive`, if it was one.
pub fn refusal(error: &anyhow::Error) -> Option<Refusal> {
    error.downcast_ref::<Refused>().map(|r| r.0)
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, DuplexStream};

    use super::*;

    fn key(byte: u8) -> SharedKey {
        SharedKey([byte; KEY_BYTES])
    }

    async fn pair(dialer_key: SharedKey) -> (Sealer, DuplexStream, Sealer, DuplexStream) {
        let (mut a, mut b) = duplex(1 << 20);
        let listener_key = key(7);
        let (dialer, listener) =
            tokio::join!(dial(&mut a, &dialer_key), accept(&mut b, &listener_key));
        (dialer.unwrap(), a, listener.unwrap(), b)
    }

    #[tokio::test]
    async fn frames_cross_in_order() {
        let (mut dialer, mut a, mut listener, mut b) = pair(key(7)).await;
        dialer.send(&mut a, b"one").await.unwrap();
        dialer.send(&mut a, b"two").await.unwrap();
        assert_eq!(listener.receive(&mut b).await.unwrap().unwrap(), b"one");
        assert_eq!(listener.receive(&mut b).await.unwrap().unwrap(), b"two");
        drop(a);
        assert!(listener.receive(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn another_key_does_not_authenticate() {
        let (mut dialer, mut a, mut listener, mut b) = pair(key(8)).await;
        dialer.send(&mut a, b"forged").await.unwrap();
        let error = listener.receive(&mut b).await.unwrap_err();
        assert_eq!(refusal(&error), Some(Refusal::Unauthenticated));
    }

    #[tokio::test]
    async fn a_frame_from_another_session_does_not_authenticate() {
        // Record a genuine session's first frame, then replay it into a new session.
        let (mut dialer, mut a, _listener, mut b) = pair(key(7)).await;
        dialer.send(&mut a, b"flows").await.unwrap();
        let mut recorded = vec![0; 4 + 5 + TAG_BYTES];
        b.read_exact(&mut recorded).await.unwrap();
        let (_dialer, mut a2, mut listener2, mut b2) = pair(key(7)).await;
        a2.write_all(&recorded).await.unwrap();
        let error = listener2.receive(&mut b2).await.unwrap_err();
        assert_eq!(refusal(&error), Some(Refusal::Unauthenticated));
    }

    #[tokio::test]
    async fn a_frame_replayed_within_its_session_does_not_authenticate() {
        let (mut dialer, mut a, mut listener, mut b) = pair(key(7)).await;
        let (mut tap_in, mut tap_out) = duplex(1 << 16);
        dialer.send(&mut tap_in, b"once").await.unwrap();
        let mut frame = vec![0; 4 + 4 + TAG_BYTES];
        tap_out.read_exact(&mut frame).await.unwrap();
        a.write_all(&frame).await.unwrap();
        a.write_all(&frame).await.unwrap();
        assert_eq!(listener.receive(&mut b).await.unwrap().unwrap(), b"once");
        let error = listener.receive(&mut b).await.unwrap_err();
        assert_eq!(refusal(&error), Some(Refusal::Unauthenticated));
    }

    #[tokio::test]
    async fn a_truncated_or_oversized_frame_is_malformed() {
        let (_dialer, mut a, mut listener, mut b) = pair(key(7)).await;
        a.write_all(&100u32.to_be_bytes()).await.unwrap();
        a.write_all(&[0; 10]).await.unwrap();
        drop(a);
        let error = listener.receive(&mut b).await.unwrap_err();
        assert_eq!(refusal(&error), Some(Refusal::Malformed));

        let (_dialer, mut a, mut listener, mut b) = pair(key(7)).await;
        a.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        let error = listener.receive(&mut b).await.unwrap_err();
        assert_eq!(refusal(&error), Some(Refusal::Malformed));
    }

    #[tokio::test]
    async fn hellos_of_another_version_or_kind_are_refused() {
        let (mut a, mut b) = duplex(1024);
        let mut other_version = hello(&[0; NONCE_BYTES]);
        other_version[5] = 9;
        a.write_all(&other_version).await.unwrap();
        let error = accept(&mut b, &key(7)).await.map(|_| ()).unwrap_err();
        assert_eq!(refusal(&error), Some(Refusal::WrongVersion));

        let (mut a, mut b) = duplex(1024);
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let error = accept(&mut b, &key(7)).await.map(|_| ()).unwrap_err();
        assert_eq!(refusal(&error), Some(Refusal::Malformed));
    }

    #[test]
    fn keys_parse_from_64_hex_digits_only() {
        assert!(SharedKey::parse(&format!("{}\n", "ab".repeat(32))).is_ok());
        assert!(SharedKey::parse(&"ab".repeat(31)).is_err());
        assert!(SharedKey::parse(&"zz".repeat(32)).is_err());
    }
}
