//! [`Forward`]: relaying messages from one side's read buffer to the other
//! side's write buffer without copying them when it can.

use bytes::{Buf, BytesMut};

/// Forwards messages from a read buffer (`buf`) to a write buffer (`out`)
/// without copying them when it can: while the forwarded messages are one
/// unbroken stretch of `buf` that started when `out` was empty, the bytes stay
/// where they are, and at the end the two buffers trade places. Anything else
/// (a message swallowed in between, something the router writes itself)
/// breaks the stretch: it is copied to `out` first, in order, and what follows
/// is copied message by message until `out` is empty again.
#[derive(Default)]
pub(crate) struct Forward {
    /// `buf[start..start + run]` is forwarded in place.
    start: usize,
    run: usize,
}

impl Forward {
    /// Forwards `buf[at..at + n]`.
    #[inline]
    pub fn pass(&mut self, buf: &BytesMut, out: &mut BytesMut, at: usize, n: usize) {
        if self.run > 0 && at == self.start + self.run {
            self.run += n;
        } else if self.run == 0 && out.is_empty() {
            self.start = at;
            self.run = n;
        } else {
            self.spill(buf, out);
            out.extend_from_slice(&buf[at..at + n]);
        }
    }

    /// Copies the stretch so far to `out`: call before writing anything else
    /// to `out`, so that it stays in order.
    #[inline]
    pub fn spill(&mut self, buf: &BytesMut, out: &mut BytesMut) {
        if self.run > 0 {
            out.extend_from_slice(&buf[self.start..self.start + self.run]);
            self.run = 0;
        }
    }

    /// `buf[..consumed]` is dealt with: drops it from `buf`, and when a
    /// stretch was forwarded in place, makes it `out` (what follows
    /// `consumed`, an incomplete message, goes back to `buf`).
    pub fn finish(mut self, buf: &mut BytesMut, out: &mut BytesMut, consumed: usize) {
        if self.run > 0 && out.is_empty() {
            let end = self.start + self.run;
            debug_assert!(end <= consumed);
            std::mem::swap(buf, out);
            buf.extend_from_slice(&out[consumed..]);
            out.truncate(end);
            out.advance(self.start);
        } else {
            debug_assert_eq!(self.run, 0, "something was written over a stretch");
            self.spill(buf, out);
            buf.advance(consumed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(s: &[u8]) -> BytesMut {
        BytesMut::from(s)
    }

    #[test]
    fn a_read_forwarded_whole_trades_buffers_without_copying() {
        let mut buf = bytes(b"aaaabbbbcc");
        let data = buf.as_ptr();
        let mut out = BytesMut::with_capacity(64);
        let mut forward = Forward::default();
        forward.pass(&buf, &mut out, 0, 4);
        forward.pass(&buf, &mut out, 4, 4);
        // "cc" is the start of a message not complete yet.
        forward.finish(&mut buf, &mut out, 8);
        assert_eq!(&out[..], b"aaaabbbb");
        assert_eq!(out.as_ptr(), data, "the bytes were copied");
        assert_eq!(&buf[..], b"cc");
    }

    #[test]
    fn a_swallowed_message_breaks_the_run_and_the_rest_is_copied() {
        let mut buf = bytes(b"aaaaXXXXbbbb");
        let mut out = BytesMut::new();
        let mut forward = Forward::default();
        forward.pass(&buf, &mut out, 0, 4);
        forward.spill(&buf, &mut out);
        forward.pass(&buf, &mut out, 8, 4);
        forward.finish(&mut buf, &mut out, 12);
        assert_eq!(&out[..], b"aaaabbbb");
        assert!(buf.is_empty());
    }

    #[test]
    fn pending_output_keeps_its_place_in_front() {
        let mut buf = bytes(b"aaaabb");
        let mut out = bytes(b"Z");
        let mut forward = Forward::default();
        forward.pass(&buf, &mut out, 0, 4);
        forward.finish(&mut buf, &mut out, 4);
        assert_eq!(&out[..], b"Zaaaa");
        assert_eq!(&buf[..], b"bb");
    }

    #[test]
    fn a_stretch_after_a_swallowed_message_is_forwarded_in_place() {
        let mut buf = bytes(b"XXXXaaaabbbbcc");
        let data = buf.as_ptr();
        let mut out = BytesMut::new();
        let mut forward = Forward::default();
        forward.pass(&buf, &mut out, 4, 4);
        forward.pass(&buf, &mut out, 8, 4);
        forward.finish(&mut buf, &mut out, 12);
        assert_eq!(&out[..], b"aaaabbbb");
        assert_eq!(out.as_ptr(), data.wrapping_add(4), "the bytes were copied");
        assert_eq!(&buf[..], b"cc");
    }

    #[test]
    fn what_the_router_writes_itself_goes_after_the_stretch() {
        let mut buf = bytes(b"aaaabbbb");
        let mut out = BytesMut::new();
        let mut forward = Forward::default();
        forward.pass(&buf, &mut out, 0, 4);
        forward.spill(&buf, &mut out);
        out.extend_from_slice(b"P");
        forward.pass(&buf, &mut out, 4, 4);
        forward.finish(&mut buf, &mut out, 8);
        assert_eq!(&out[..], b"aaaaPbbbb");
        assert!(buf.is_empty());
    }

    #[test]
    fn nothing_forwarded_leaves_both_buffers_alone() {
        let mut buf = bytes(b"XXXXbb");
        let mut out = BytesMut::new();
        let mut forward = Forward::default();
        forward.spill(&buf, &mut out);
        forward.finish(&mut buf, &mut out, 4);
        assert!(out.is_empty());
        assert_eq!(&buf[..], b"bb");
    }
}
