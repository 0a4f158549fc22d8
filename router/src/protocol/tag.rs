//! Message type bytes of the v3 protocol the router looks at, by name.
//! Constants rather than an enum: they are matched against the raw byte of
//! every relayed message, and an unknown byte is relayed as it is.

/// Messages a client sends (after startup).
pub mod frontend {
    /// Query: one or more statements in the simple protocol.
    pub const QUERY: u8 = b'Q';
    /// Parse: prepare a statement (extended protocol).
    pub const PARSE: u8 = b'P';
    /// Bind: a portal from a prepared statement.
    pub const BIND: u8 = b'B';
    /// Execute: run a portal.
    pub const EXECUTE: u8 = b'E';
    /// Describe: a statement (`S`) or portal (`P`).
    pub const DESCRIBE: u8 = b'D';
    /// Close: a statement (`S`) or portal (`P`).
    pub const CLOSE: u8 = b'C';
    /// Sync: ends an extended-protocol batch; answered by ReadyForQuery.
    pub const SYNC: u8 = b'S';
    /// Flush: asks for the answers so far, ends nothing.
    pub const FLUSH: u8 = b'H';
    /// FunctionCall: answered by ReadyForQuery, as a Query is.
    pub const FUNCTION_CALL: u8 = b'F';
    /// Terminate: the client is leaving.
    pub const TERMINATE: u8 = b'X';
    /// CopyData, during COPY FROM STDIN.
    pub const COPY_DATA: u8 = b'd';
    /// CopyDone: the end of COPY FROM STDIN.
    pub const COPY_DONE: u8 = b'c';
    /// CopyFail: COPY FROM STDIN abandoned.
    pub const COPY_FAIL: u8 = b'f';
    /// PasswordMessage (and the SASL messages) during authentication.
    pub const PASSWORD: u8 = b'p';
}

/// Messages a server sends (or the router writes itself).
pub mod backend {
    /// ReadyForQuery, with the transaction status.
    pub const READY_FOR_QUERY: u8 = b'Z';
    /// ErrorResponse.
    pub const ERROR_RESPONSE: u8 = b'E';
    /// NoticeResponse.
    pub const NOTICE_RESPONSE: u8 = b'N';
    /// ParameterStatus: a reported setting changed.
    pub const PARAMETER_STATUS: u8 = b'S';
    /// DataRow.
    pub const DATA_ROW: u8 = b'D';
    /// CommandComplete, with the command tag.
    pub const COMMAND_COMPLETE: u8 = b'C';
    /// ParseComplete.
    pub const PARSE_COMPLETE: u8 = b'1';
    /// BindComplete.
    pub const BIND_COMPLETE: u8 = b'2';
    /// CloseComplete.
    pub const CLOSE_COMPLETE: u8 = b'3';
    /// NoData: the statement or portal returns no rows.
    pub const NO_DATA: u8 = b'n';
    /// ParameterDescription.
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    /// Authentication request.
    pub const AUTHENTICATION: u8 = b'R';
    /// BackendKeyData, for cancel requests.
    pub const BACKEND_KEY_DATA: u8 = b'K';
    /// NegotiateProtocolVersion.
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
}
