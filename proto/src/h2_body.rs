//! An HTTP/2 stream's receiving half as an `http_body::Body`, for the code that speaks gRPC
//! over a bare `h2` connection: Keel's client-connection server (`keel-server`'s
//! `h2_server`, request bodies) and the load generator's lean transport (`keel-bench`'s
//! `lean`, response bodies). tonic hands such a body to its generated code as it would one
//! from hyper.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame};

/// The stream's DATA frames (flow-control capacity given back as each is read), then its
/// trailers.
pub struct H2Body {
    recv: h2::RecvStream,
    data_done: bool,
    done: bool,
}

impl H2Body {
    pub fn new(recv: h2::RecvStream) -> H2Body {
        // A stream that ended with its headers (END_STREAM on HEADERS) has no body at all.
        let done = recv.is_end_stream();
        H2Body {
            recv,
            data_done: done,
            done,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.done = true;
        match trailers {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
