//! The untagged packets a client may open a connection with: SSLRequest,
//! GSSENCRequest, CancelRequest and StartupMessage (protocol docs, "Message
//! Formats"). Each starts with a four-byte length and a four-byte code.

use bytes::{Buf, Bytes, BytesMut};

use super::{cstr, ProtocolError};

/// Postgres refuses startup packets above this size (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Request code of SSLRequest.
pub const SSL_REQUEST: u32 = 80_877_103;
/// Request code of GSSENCRequest.
pub const GSSENC_REQUEST: u32 = 80_877_104;
/// Request code of CancelRequest.
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// Protocol 3.0.
pub const PROTOCOL_3_0: u32 = 196_608;

/// One packet a client may send before it is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    /// The client asks for TLS.
    SslRequest,
    /// The client asks for GSSAPI encryption.
    GssEncRequest,
    /// Cancel the query running on the session with this key.
    Cancel {
        /// Process id of BackendKeyData.
        pid: i32,
        /// Secret key of BackendKeyData (4 bytes in 3.0, up to 256 in 3.2).
        secret: Bytes,
    },
    /// A session starts.
    Startup(Startup),
}

/// A StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    /// Protocol major version (always 3 once parsed).
    pub major: u16,
    /// Protocol minor version asked for; the router answers 3.0.
    pub minor: u16,
    /// Parameters in the order the client sent them.
    pub params: Vec<(String, String)>,
}

impl Startup {
    /// A parameter's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Splits the first packet off `buf` when it is complete.
pub fn parse(buf: &mut BytesMut) -> Result<Option<FirstPacket>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(ProtocolError::BadLength(len));
    }
    if len as usize > MAX_STARTUP_LEN {
        return Err(ProtocolError::TooLarge {
            len: u64::from(len),
            max: MAX_STARTUP_LEN as u64,
        });
    }
    if buf.len() < len as usize {
        return Ok(None);
    }
    let mut packet = buf.split_to(len as usize).freeze();
    packet.advance(4);
    let code = packet.get_u32();
    match code {
        SSL_REQUEST if packet.is_empty() => Ok(Some(FirstPacket::SslRequest)),
        GSSENC_REQUEST if packet.is_empty() => Ok(Some(FirstPacket::GssEncRequest)),
        SSL_REQUEST | GSSENC_REQUEST => Err(ProtocolError::Malformed {
            what: "encryption request",
        }),
        CANCEL_REQUEST => {
            if packet.len() < 8 || packet.len() > 4 + 256 {
                return Err(ProtocolError::Malformed {
                    what: "CancelRequest",
                });
            }
            let pid = packet.get_i32();
            Ok(Some(FirstPacket::Cancel {
                pid,
                secret: packet,
            }))
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::UnsupportedVersion { major, minor });
            }
            let params = parse_params(&packet)?;
            Ok(Some(FirstPacket::Startup(Startup {
                major,
                minor,
                params,
            })))
        }
    }
}

fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    const WHAT: ProtocolError = ProtocolError::Malformed {
        what: "StartupMessage parameters",
    };
    let mut params = Vec::new();
    loop {
        match body {
            [0] => return Ok(params),
            [] => return Err(WHAT),
            _ => {}
        }
        let (name, rest) = cstr(body).ok_or(WHAT)?;
        let (value, rest) = cstr(rest).ok_or(WHAT)?;
        let name = std::str::from_utf8(name).map_err(|_| WHAT)?;
        let value = std::str::from_utf8(value).map_err(|_| WHAT)?;
        if params.iter().any(|(k, _)| k == name) {
            return Err(WHAT);
        }
        params.push((name.to_string(), value.to_string()));
        body = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn packet(code: u32, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32(8 + body.len() as u32);
        b.put_u32(code);
        b.put_slice(body);
        b
    }

    #[test]
    fn requests() {
        assert_eq!(
            parse(&mut packet(SSL_REQUEST, b"")).expect("ok"),
            Some(FirstPacket::SslRequest)
        );
        assert_eq!(
            parse(&mut packet(GSSENC_REQUEST, b"")).expect("ok"),
            Some(FirstPacket::GssEncRequest)
        );
        let cancel = parse(&mut packet(CANCEL_REQUEST, &[0, 0, 0, 7, 1, 2, 3, 4]))
            .expect("ok")
            .expect("packet");
        assert_eq!(
            cancel,
            FirstPacket::Cancel {
                pid: 7,
                secret: Bytes::from_static(&[1, 2, 3, 4])
            }
        );
    }

    #[test]
    fn startup_params_in_order() {
        let mut buf = packet(PROTOCOL_3_0, b"user\0bob\0database\0app\0\0");
        buf.extend_from_slice(b"extra");
        let FirstPacket::Startup(s) = parse(&mut buf).expect("ok").expect("packet") else {
            panic!("not a startup")
        };
        assert_eq!(s.get("user"), Some("bob"));
        assert_eq!(s.params[1].0, "database");
        assert_eq!(&buf[..], b"extra");
    }

    #[test]
    fn bad_packets() {
        assert!(parse(&mut packet(PROTOCOL_3_0, b"user\0bob\0")).is_err());
        assert!(parse(&mut packet(PROTOCOL_3_0, b"user\0bob")).is_err());
        assert!(parse(&mut packet(PROTOCOL_3_0, b"user\0a\0user\0b\0\0")).is_err());
        assert!(matches!(
            parse(&mut packet(2 << 16, b"\0")),
            Err(ProtocolError::UnsupportedVersion { major: 2, .. })
        ));
        let mut short = BytesMut::from(&[0u8, 0, 0, 4][..]);
        assert!(matches!(
            parse(&mut short),
            Err(ProtocolError::BadLength(4))
        ));
        let mut huge = BytesMut::from(&[0u8, 1, 0, 0][..]);
        assert!(matches!(
            parse(&mut huge),
            Err(ProtocolError::TooLarge { .. })
        ));
        let mut partial = packet(PROTOCOL_3_0, b"user\0bob\0\0");
        partial.truncate(10);
        assert_eq!(parse(&mut partial).expect("ok"), None);
    }
}
