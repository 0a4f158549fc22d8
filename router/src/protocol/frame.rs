//! Framing of regular (tagged) messages: a one-byte type, a four-byte length
//! that counts itself but not the type, then the body. Readers first check
//! that a whole frame is buffered, then split it off; the limit is checked on
//! the header alone, before any body is buffered.

use bytes::{Buf, BytesMut};

use super::ProtocolError;

/// Type byte plus length field.
pub const HEADER_LEN: usize = 5;

/// A frame header: the type byte and the total frame size (header included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message type.
    pub tag: u8,
    /// Bytes of the whole frame, type byte and length field included.
    pub frame_len: usize,
}

/// Peeks the header at the start of `buf`: `Ok(None)` when fewer than five
/// bytes are buffered, an error when the length is invalid or above `max`.
pub fn peek_header(buf: &[u8], max: usize) -> Result<Option<Header>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength(len));
    }
    let frame_len = len as usize + 1;
    if frame_len > max {
        return Err(ProtocolError::TooLarge {
            len: frame_len as u64,
            max: max as u64,
        });
    }
    Ok(Some(Header {
        tag: buf[0],
        frame_len,
    }))
}

/// The first complete frame in `buf`, if one is buffered: its header and the
/// body range. Never consumes anything.
pub fn complete(buf: &[u8], max: usize) -> Result<Option<Header>, ProtocolError> {
    match peek_header(buf, max)? {
        Some(h) if buf.len() >= h.frame_len => Ok(Some(h)),
        _ => Ok(None),
    }
}

/// Splits the first complete frame off `buf`.
pub fn split(buf: &mut BytesMut, max: usize) -> Result<Option<(u8, BytesMut)>, ProtocolError> {
    match complete(buf, max)? {
        Some(h) => {
            let mut frame = buf.split_to(h.frame_len);
            frame.advance(HEADER_LEN);
            Ok(Some((h.tag, frame)))
        }
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_complete_and_oversized() {
        let mut buf = BytesMut::from(&b"Q\0\0\0"[..]);
        assert_eq!(split(&mut buf, 100).expect("ok"), None);
        buf.extend_from_slice(b"\x08SEL");
        assert_eq!(split(&mut buf, 100).expect("ok"), None);
        buf.extend_from_slice(b"\0Z");
        let (tag, body) = split(&mut buf, 100).expect("ok").expect("frame");
        assert_eq!(tag, b'Q');
        assert_eq!(&body[..], b"SEL\0");
        assert_eq!(&buf[..], b"Z");
        let big = BytesMut::from(&b"Q\x7f\xff\xff\xff"[..]);
        assert!(matches!(
            complete(&big, 1000),
            Err(ProtocolError::TooLarge { .. })
        ));
        let bad = BytesMut::from(&b"Q\0\0\0\x03"[..]);
        assert!(matches!(
            complete(&bad, 1000),
            Err(ProtocolError::BadLength(3))
        ));
    }
}
