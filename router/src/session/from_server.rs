//! The server's messages in the relay: forwarded to the client as they
//! arrive (a large one in pieces), with the few the router watches read on
//! the way: ReadyForQuery (the transaction status, told to the
//! [`Tracker`](super::tracker::Tracker)), ErrorResponse, ParameterStatus,
//! CommandComplete, and the answers to the router's own Parse and Close.

use crate::client::Ended;
use crate::params::{set_param, set_shared_param, SETTABLE};
use crate::protocol::backend::{parse_error, parse_parameter_status, TxStatus};
use crate::protocol::tag::backend as tag;
use crate::protocol::{cstr, frame};

use super::forward::Forward;
use super::Session;

impl Session {
    /// Forwards what the server sent, watching the messages the router tracks.
    pub(super) fn on_server_bytes(&mut self) -> Result<(), Ended> {
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let buf = &mut server.buf;
        let out = &mut self.client.wbuf;
        let mut forward = Forward::default();
        // Bytes of `buf` looked at so far.
        let mut pos = 0;
        let mut fatal: Option<String> = None;
        loop {
            let rest = self.proto.server_rest();
            if rest > 0 {
                let n = rest.min(buf.len() - pos);
                if n == 0 {
                    break;
                }
                forward.pass(buf, out, pos, n);
                pos += n;
                self.proto.server_passed(n);
                continue;
            }
            let header = match frame::peek_header(&buf[pos..], usize::MAX) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    fatal = Some(format!("the server broke the protocol: {e}"));
                    break;
                }
            };
            let watched = matches!(
                header.tag,
                tag::PARSE_COMPLETE
                    | tag::CLOSE_COMPLETE
                    | tag::READY_FOR_QUERY
                    | tag::ERROR_RESPONSE
                    | tag::PARAMETER_STATUS
                    | tag::COMMAND_COMPLETE
            );
            if !watched {
                // Rows and the rest are not looked into: forwarded as
                // they arrive, even a frame split across reads.
                let n = header.frame_len.min(buf.len() - pos);
                forward.pass(buf, out, pos, n);
                pos += n;
                self.proto.server_streaming(header.frame_len, n);
                continue;
            }
            if buf.len() - pos < header.frame_len {
                break;
            }
            let body = &buf[pos + 5..pos + header.frame_len];
            match header.tag {
                tag::PARSE_COMPLETE | tag::CLOSE_COMPLETE => {
                    if self.stmts.swallows(header.tag == tag::CLOSE_COMPLETE) {
                        // The answer to the router's own message.
                        forward.spill(buf, out);
                        pos += header.frame_len;
                        continue;
                    }
                }
                tag::READY_FOR_QUERY => {
                    let Some(status) = body.first().copied().and_then(TxStatus::from_byte) else {
                        fatal = Some("malformed ReadyForQuery from the server".into());
                        break;
                    };
                    let idle = self.proto.on_ready(status);
                    self.state.on_ready(status);
                    self.stmts.on_ready(idle);
                }
                tag::ERROR_RESPONSE => {
                    let fields = parse_error(body);
                    if fields.is_fatal() {
                        fatal = Some(format!("the server ended the session: {}", fields.message));
                        // Consumed, not forwarded: the loss is reported instead.
                        forward.spill(buf, out);
                        pos += header.frame_len;
                        break;
                    }
                    self.state.on_error();
                    self.stmts.on_error_in(&mut server.prepared);
                }
                tag::PARAMETER_STATUS => {
                    if let Some((name, value)) = parse_parameter_status(body) {
                        set_shared_param(&mut self.known, name, value);
                        if SETTABLE.contains(&name) {
                            set_param(&mut self.changed, name, value);
                        }
                        set_shared_param(&mut server.params, name, value);
                    }
                }
                _ => {
                    if let Some((command, _)) = cstr(body) {
                        self.state.on_command_complete(command);
                    }
                }
            }
            forward.pass(buf, out, pos, header.frame_len);
            pos += header.frame_len;
        }
        forward.finish(buf, out, pos);
        match fatal {
            Some(reason) => self.server_lost(&reason),
            None => Ok(()),
        }
    }
}
