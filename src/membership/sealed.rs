//! Gossip over UDP with every datagram sealed by the cluster keyring (ChaCha20-Poly1305; see
//! [`crate::keyring`]). chitchat has no authentication of its own; this `Transport` seals what
//! chitchat sends and drops every datagram no key of the ring opens: a node without the secret
//! can neither join nor inject state, and what it hears is ciphertext.
//!
//! chitchat 0.13 keeps its byte encoding private, so the plaintext side is chitchat's own
//! `UdpSocket` on loopback: an envelope to send goes through a loopback hop to be encoded, and
//! an opened datagram goes through one to be decoded. Both hops are on 127.0.0.1 ports this
//! node chose, and a datagram that reaches them from any other address is dropped.
//!
//! A sealed datagram is [`crate::keyring::SEAL_OVERHEAD_BYTES`] longer than chitchat's; one
//! that would pass UDP's 65,507-byte limit (a digest of about 1,300 nodes) is not sent.

use crate::keyring::Keyring;
use anyhow::Context;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as PlainSocket};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::UdpSocket;

const DATAGRAM_BYTES_MAX: usize = 65_507;
/// Received gossip waiting for chitchat; more is dropped (gossip tolerates loss).
const RECEIVED_QUEUE: usize = 256;
/// A loopback hop answers at once; past this a datagram is taken as lost there.
const HOP_TIMEOUT: Duration = Duration::from_millis(200);

pub struct SealedUdpTransport {
    pub keyring: Arc<Keyring>,
    /// Authenticated with every datagram: the cluster id.
    pub context: Vec<u8>,
}

async fn loopback() -> anyhow::Result<UdpSocket> {
    UdpSocket::bind("127.0.0.1:0").await.context("failed to bind a loopback socket for gossip")
}

#[async_trait::async_trait]
impl Transport for SealedUdpTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let public = Arc::new(
            UdpSocket::bind(listen_addr)
                .await
                .with_context(|| format!("failed to bind to {listen_addr}/UDP for gossip"))?,
        );
        let local = public.local_addr()?;
        // Encoding: chitchat's socket sends the envelope to `encoded`, which seals it.
        let encoder = PlainSocket::open("127.0.0.1:0".parse()?).await?;
        let encoded = loopback().await?;
        // Decoding: an opened datagram goes from `relay` to chitchat's socket `decoder`.
        let decoder = PlainSocket::open("127.0.0.1:0".parse()?).await?;
        let relay = loopback().await?;
        let (tx, rx) = tokio::sync::mpsc::channel(RECEIVED_QUEUE);
        let receiver =
            tokio::spawn(receive(public.clone(), relay, decoder, self.keyring.clone(), self.context.clone(), tx));
        Ok(Box::new(SealedUdpSocket {
            local,
            public,
            encoder,
            encoded,
            keyring: self.keyring.clone(),
            context: self.context.clone(),
            sealed: Vec::with_capacity(DATAGRAM_BYTES_MAX),
            buf: vec![0u8; DATAGRAM_BYTES_MAX].into_boxed_slice(),
            received: rx,
            receiver,
        }))
    }
}

struct SealedUdpSocket {
    local: SocketAddr,
    public: Arc<UdpSocket>,
    encoder: PlainSocket,
    encoded: UdpSocket,
    keyring: Arc<Keyring>,
    context: Vec<u8>,
    sealed: Vec<u8>,
    buf: Box<[u8]>,
    received: tokio::sync::mpsc::Receiver<anyhow::Result<RecvOutcome>>,
    receiver: tokio::task::JoinHandle<()>,
}

impl Drop for SealedUdpSocket {
    fn drop(&mut self) {
        self.receiver.abort();
    }
}

/// Errors that say nothing about the socket itself (a peer's port closed, memory pressure).
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::OutOfMemory | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused
    )
}

/// Receives sealed gossip, opens it, has chitchat's socket decode it, and queues it for
/// [`Socket::recv`] with its real sender (a task of its own, so `recv` stays cancellable).
async fn receive(
    public: Arc<UdpSocket>,
    relay: UdpSocket,
    mut decoder: PlainSocket,
    keyring: Arc<Keyring>,
    context: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<anyhow::Result<RecvOutcome>>,
) {
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX].into_boxed_slice();
    let (Ok(relay_addr), Ok(decoder_addr)) = (relay.local_addr(), decoder.local_addr()) else { return };
    loop {
        let (len, from_addr) = match public.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) if is_transient(&e) => continue,
            Err(e) => {
                let _ = tx.send(Err(anyhow::Error::new(e).context("fatal gossip receive error"))).await;
                return;
            }
        };
        let Some(plain) = keyring.open_sealed(&mut buf[..len], &context) else {
            if keyring.rejected.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000) {
                tracing::warn!(from = %from_addr, "dropped gossip that no key of this node's keyring opens (a node without the cluster secret?)");
            }
            continue;
        };
        if relay.send_to(plain, decoder_addr).await.is_err() {
            continue;
        }
        // Only what came through our relay is taken: a datagram another local process sent to
        // the decoder's port is dropped, and so is one the hop lost (after the timeout).
        let outcome = loop {
            match tokio::time::timeout(HOP_TIMEOUT, decoder.recv()).await {
                Ok(Ok(outcome)) if outcome.from_addr == relay_addr => break Some(outcome),
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(_) => break None,
            }
        };
        // chitchat's socket logs and skips what does not decode: an authenticated sender
        // running another protocol version, say.
        let Some(outcome) = outcome else { continue };
        let outcome = RecvOutcome { from_addr, envelope: outcome.envelope, num_bytes_received: len };
        if tx.try_send(Ok(outcome)).is_err() && tx.is_closed() {
            return;
        }
    }
}

#[async_trait::async_trait]
impl Socket for SealedUdpSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.local)
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        // A send cancelled after its loopback hop may have left its datagram behind.
        while self.encoded.try_recv_from(&mut self.buf).is_ok() {}
        let encoded_addr = self.encoded.local_addr()?;
        let encoder_addr = self.encoder.local_addr()?;
        self.encoder.send(encoded_addr, envelope).await?;
        let len = loop {
            match tokio::time::timeout(HOP_TIMEOUT, self.encoded.recv_from(&mut self.buf)).await {
                Ok(Ok((len, from))) if from == encoder_addr => break len,
                Ok(Ok(_)) => continue,
                Ok(Err(e)) if is_transient(&e) => return Ok(SendOutcome { num_bytes_sent: 0 }),
                Ok(Err(e)) => return Err(e).context("gossip encoding hop failed"),
                Err(_) => return Ok(SendOutcome { num_bytes_sent: 0 }),
            }
        };
        self.keyring.seal(&self.buf[..len], &self.context, &mut self.sealed);
        if self.sealed.len() > DATAGRAM_BYTES_MAX {
            tracing::warn!(
                bytes = self.sealed.len(),
                "a sealed gossip message is larger than a UDP datagram; not sent"
            );
            return Ok(SendOutcome { num_bytes_sent: 0 });
        }
        match self.public.send_to(&self.sealed, to).await {
            Ok(n) => Ok(SendOutcome { num_bytes_sent: n }),
            Err(e) if is_transient(&e) => Ok(SendOutcome { num_bytes_sent: 0 }),
            Err(e) => Err(e).context("failed to send a gossip message"),
        }
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        match self.received.recv().await {
            Some(outcome) => outcome,
            None => anyhow::bail!("the gossip receiver stopped"),
        }
    }
}
