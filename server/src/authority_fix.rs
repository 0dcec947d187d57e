//! A connection wrapper that makes etcd 3.4 clients' malformed HTTP/2 `:authority` acceptable.
//!
//! etcd 3.4's Go client, when it dials one endpoint directly (`etcdctl endpoint status
//! --cluster`, `endpoint health`, `endpoint hashkv`, `move-leader`), sends the endpoint URL
//! itself as the `:authority` pseudo-header, e.g. `http://127.0.0.1:2379`. Go's gRPC server
//! ignores it; the Rust HTTP/2 stack (h2) rejects the request as malformed and resets the
//! stream. This wrapper sits between the socket and the HTTP/2 server and rewrites such an
//! authority to its `host:port` part.
//!
//! How: it follows the client-to-server byte stream frame by frame. Every header block
//! (HEADERS + CONTINUATION frames) is HPACK-decoded, which keeps a mirror of the client's
//! dynamic table. A gRPC channel sends one authority on every request, so the first header
//! block decides: if its authority is well-formed, the rest of the connection passes through
//! untouched (no more parsing, no cost); if not, that block and every later block of the
//! connection is re-encoded by our own HPACK encoder, and the server's table follows our
//! encoder. Frames other than HEADERS/CONTINUATION (DATA, SETTINGS, ...) are streamed through
//! untouched, and a connection that does not start with the HTTP/2 preface (HTTP/1.1) is not
//! touched at all.
//!
//! Worked example, the first request of `etcdctl --endpoints http://127.0.0.1:2379 endpoint
//! status`:
//!
//! ```text
//! client sends   HEADERS(stream 1, END_HEADERS) block = [:method POST, :scheme http,
//!                  :path /etcdserverpb.Maintenance/Status, :authority http://127.0.0.1:2379, ...]
//! decoder        mirrors the client's dynamic table; sees "://" in :authority → rewrite mode
//! server gets    HEADERS(stream 1, END_HEADERS) block = encode([... :authority 127.0.0.1:2379 ...])
//! ```

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The default SETTINGS_MAX_FRAME_SIZE, which the server never raises for clients.
const MAX_FRAME: usize = 16_384;
/// Largest header block accepted (h2's default max header list size is 16 MiB; gRPC headers
/// are tiny).
const MAX_BLOCK: usize = 1 << 20;

enum Mode {
    /// Checking whether the connection starts with the HTTP/2 preface.
    Preface,
    /// Not HTTP/2 (or given up): bytes pass through.
    Passthrough,
    /// Following HTTP/2 frames.
    Frames,
}

/// A header block being collected across HEADERS and CONTINUATION frames.
struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    fragment: Vec<u8>,
    raw: Vec<u8>,
}

pub struct AuthorityFix<T> {
    inner: T,
    mode: Mode,
    /// Bytes read from the socket, not yet processed.
    input: Vec<u8>,
    /// Processed bytes waiting to be handed to the HTTP/2 server.
    output: Vec<u8>,
    output_pos: usize,
    /// Payload bytes of the current non-header frame still to stream through.
    passthrough_left: usize,
    pending: Option<PendingBlock>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: Option<loona_hpack::Encoder<'static>>,
    eof: bool,
}

impl<T> AuthorityFix<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            mode: Mode::Preface,
            input: Vec::new(),
            output: Vec::new(),
            output_pos: 0,
            passthrough_left: 0,
            pending: None,
            decoder: loona_hpack::Decoder::new(),
            encoder: None,
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Moves whatever can be decided from `input` to `output`.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.mode {
                Mode::Passthrough => {
                    self.output.append(&mut self.input);
                    return Ok(());
                }
                Mode::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.mode = Mode::Passthrough;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    self.output.extend(self.input.drain(..PREFACE.len()));
                    self.mode = Mode::Frames;
                }
                Mode::Frames => {
                    if self.passthrough_left > 0 {
                        let n = self.passthrough_left.min(self.input.len());
                        self.output.extend(self.input.drain(..n));
                        self.passthrough_left -= n;
                        if self.passthrough_left > 0 {
                            return Ok(());
                        }
                        continue;
                    }
                    if self.input.len() < FRAME_HEADER_LEN {
                        return Ok(());
                    }
                    let len = (usize::from(self.input[0]) << 16)
                        | (usize::from(self.input[1]) << 8)
                        | usize::from(self.input[2]);
                    let kind = self.input[3];
                    if kind != TYPE_HEADERS && kind != TYPE_CONTINUATION {
                        self.output.extend(self.input.drain(..FRAME_HEADER_LEN));
                        self.passthrough_left = len;
                        continue;
                    }
                    if self.input.len() < FRAME_HEADER_LEN + len {
                        if len > MAX_BLOCK {
                            return Err(io::Error::other("HTTP/2 header frame too large"));
                        }
                        return Ok(());
                    }
                    let frame: Vec<u8> = self.input.drain(..FRAME_HEADER_LEN + len).collect();
                    self.header_frame(&frame)?;
                }
            }
        }
    }

    fn header_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let kind = frame[3];
        let flags = frame[4];
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER_LEN..];
        let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP/2 frame");
        let fragment: &[u8] = if kind == TYPE_HEADERS {
            let mut start = 0;
            let mut end = payload.len();
            if flags & FLAG_PADDED != 0 {
                let pad = usize::from(*payload.first().ok_or_else(malformed)?);
                start = 1;
                end = end.checked_sub(pad).ok_or_else(malformed)?;
            }
            if flags & FLAG_PRIORITY != 0 {
                start += 5;
            }
            if start > end {
                return Err(malformed());
            }
            if self.pending.is_some() {
                return Err(malformed());
            }
            self.pending = Some(PendingBlock {
                stream_id,
                end_stream: flags & FLAG_END_STREAM != 0,
                fragment: Vec::new(),
                raw: Vec::new(),
            });
            &payload[start..end]
        } else {
            payload
        };
        let Some(block) = self.pending.as_mut() else {
            return Err(malformed());
        };
        block.fragment.extend_from_slice(fragment);
        block.raw.extend_from_slice(frame);
        if block.fragment.len() > MAX_BLOCK {
            return Err(io::Error::other("HTTP/2 header block too large"));
        }
        if flags & FLAG_END_HEADERS == 0 {
            return Ok(());
        }
        let Some(block) = self.pending.take() else {
            return Err(malformed());
        };
        self.finish_block(block)
    }

    fn finish_block(&mut self, block: PendingBlock) -> io::Result<()> {
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut rewrite = false;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                let mut value = value.into_owned();
                if name.as_ref() == b":authority"
                    && let Some(pos) = value.windows(3).position(|w| w == b"://")
                {
                    value.drain(..pos + 3);
                    while value.last() == Some(&b'/') {
                        value.pop();
                    }
                    rewrite = true;
                }
                headers.push((name.into_owned(), value));
            })
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("HPACK: {e:?}")))?;
        if rewrite && self.encoder.is_none() {
            tracing::debug!("rewriting a client's malformed :authority (etcd 3.4 client)");
            self.encoder = Some(loona_hpack::Encoder::new());
        }
        let Some(encoder) = self.encoder.as_mut() else {
            // A gRPC channel uses one authority for all its requests: a connection whose first
            // request is well-formed needs no more attention, so stop parsing it altogether.
            self.output.extend_from_slice(&block.raw);
            self.mode = Mode::Passthrough;
            return Ok(());
        };
        let encoded = encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let chunks: Vec<&[u8]> = if encoded.is_empty() {
            vec![&[][..]]
        } else {
            encoded.chunks(MAX_FRAME).collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let kind = if i == 0 {
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            };
            let mut flags = 0;
            if i == 0 && block.end_stream {
                flags |= FLAG_END_STREAM;
            }
            if i == last {
                flags |= FLAG_END_HEADERS;
            }
            let len = chunk.len();
            self.output.extend_from_slice(&[
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                kind,
                flags,
            ]);
            self.output
                .extend_from_slice(&block.stream_id.to_be_bytes());
            self.output.extend_from_slice(chunk);
        }
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityFix<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.output_pos < this.output.len() {
                let n = (this.output.len() - this.output_pos).min(buf.remaining());
                buf.put_slice(&this.output[this.output_pos..this.output_pos + n]);
                this.output_pos += n;
                if this.output_pos == this.output.len() {
                    this.output.clear();
                    this.output_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Fast path: streaming a DATA payload (or a non-HTTP/2 connection) straight into
            // the caller's buffer, with no copy through ours.
            let direct = matches!(this.mode, Mode::Passthrough)
                || (matches!(this.mode, Mode::Frames)
                    && this.passthrough_left > 0
                    && this.input.is_empty());
            if direct {
                let limit = match this.mode {
                    Mode::Passthrough => buf.remaining(),
                    _ => this.passthrough_left.min(buf.remaining()),
                };
                let dst = buf.initialize_unfilled_to(limit);
                let mut rb = ReadBuf::new(dst);
                return match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        buf.advance(n);
                        if n == 0 && limit > 0 {
                            this.eof = true;
                        }
                        if !matches!(this.mode, Mode::Passthrough) {
                            this.passthrough_left -= n;
                        }
                        Poll::Ready(Ok(()))
                    }
                    other => other,
                };
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        this.eof = true;
                        // Hand over anything left undecided (e.g. a partial frame).
                        this.output.append(&mut this.input);
                        continue;
                    }
                    this.input.extend_from_slice(rb.filled());
                    this.process()?;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for AuthorityFix<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    async fn run(input: Vec<u8>) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(&input).await.expect("write");
        drop(client);
        let mut fixed = AuthorityFix::new(server);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.expect("read");
        out
    }

    fn decode_blocks(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut pos = PREFACE.len();
        let mut blocks = Vec::new();
        while pos < bytes.len() {
            let len = (usize::from(bytes[pos]) << 16)
                | (usize::from(bytes[pos + 1]) << 8)
                | usize::from(bytes[pos + 2]);
            let kind = bytes[pos + 3];
            let payload = &bytes[pos + 9..pos + 9 + len];
            if kind == TYPE_HEADERS {
                blocks.push(decoder.decode(payload).expect("decode"));
            }
            pos += 9 + len;
        }
        blocks
    }

    #[tokio::test]
    async fn rewrites_scheme_in_authority_and_keeps_later_blocks_consistent() {
        let mut client_encoder = loona_hpack::Encoder::new();
        let req = |authority: &'static [u8]| {
            vec![
                (&b":method"[..], &b"POST"[..]),
                (&b":scheme"[..], &b"http"[..]),
                (&b":path"[..], &b"/etcdserverpb.Maintenance/Status"[..]),
                (&b":authority"[..], authority),
                (&b"content-type"[..], &b"application/grpc"[..]),
            ]
        };
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let first = client_encoder.encode(req(b"http://127.0.0.1:2379"));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &first));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0"));
        let second = client_encoder.encode(req(b"http://127.0.0.1:2379"));
        // Split the second block over HEADERS + CONTINUATION.
        let (a, b) = second.split_at(second.len() / 2);
        input.extend(frame(TYPE_HEADERS, 0, 3, a));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, b));
        let third = client_encoder.encode(req(b"127.0.0.1:2379"));
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            5,
            &third,
        ));

        let out = run(input).await;
        assert!(out.starts_with(PREFACE));
        let blocks = decode_blocks(&out);
        assert_eq!(blocks.len(), 3);
        for block in &blocks {
            let authority = block
                .iter()
                .find(|(n, _)| n == b":authority")
                .map(|(_, v)| v.clone());
            assert_eq!(authority.as_deref(), Some(&b"127.0.0.1:2379"[..]));
            assert_eq!(block.len(), 5);
        }
    }

    #[tokio::test]
    async fn http1_and_well_formed_http2_pass_through_unchanged() {
        let http1 = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(run(http1.clone()).await, http1);

        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode(vec![
            (&b":method"[..], &b"POST"[..]),
            (&b":authority"[..], &b"localhost:2379"[..]),
        ]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        input.extend(frame(0x0, 0, 1, &vec![7u8; 40_000]));
        assert_eq!(run(input.clone()).await, input);
    }
}
