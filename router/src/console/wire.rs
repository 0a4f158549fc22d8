//! The console's answers on the wire, encoded with the `pgwire` crate's
//! message types (RowDescription, DataRow, CommandComplete, ErrorResponse,
//! ReadyForQuery): the console's side of the protocol only; the relay keeps
//! its own writers (`protocol::backend`), which copy nothing.

use bytes::{BufMut, BytesMut};
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
use pgwire::messages::response::{
    CommandComplete, ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus,
};
use pgwire::messages::Message;

/// A column's type, as PgBouncer's console sends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Type {
    Text,
    Int4,
    Int8,
    Float8,
}

impl Type {
    fn oid(self) -> u32 {
        match self {
            Type::Text => 25,
            Type::Int4 => 23,
            Type::Int8 => 20,
            Type::Float8 => 701,
        }
    }

    fn size(self) -> i16 {
        match self {
            Type::Text => -1,
            Type::Int4 => 4,
            Type::Int8 | Type::Float8 => 8,
        }
    }
}

/// One answer to a SHOW: columns, rows of text values (None: NULL).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ResultSet {
    pub columns: Vec<(&'static str, Type)>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl ResultSet {
    pub fn new(columns: &[(&'static str, Type)]) -> ResultSet {
        ResultSet {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<Option<String>>) {
        debug_assert_eq!(row.len(), self.columns.len());
        self.rows.push(row);
    }
}

/// A value of a row.
pub(crate) fn v(value: impl ToString) -> Option<String> {
    Some(value.to_string())
}

// pgwire's encoders fail only past their message size limits (1 GB for a
// row): a console answer is far below, and a failure leaves out the message.

pub(crate) fn result_set(out: &mut BytesMut, set: &ResultSet, tag: &str) {
    let fields = set
        .columns
        .iter()
        .map(|(name, ty)| FieldDescription::new(name.to_string(), 0, 0, ty.oid(), ty.size(), -1, 0))
        .collect();
    let _ = RowDescription::new(fields).encode(out);
    for row in &set.rows {
        let mut data = BytesMut::new();
        for value in row {
            match value {
                Some(text) => {
                    data.put_i32(text.len() as i32);
                    data.put_slice(text.as_bytes());
                }
                None => data.put_i32(-1),
            }
        }
        let _ = DataRow::new(data, row.len() as i16).encode(out);
    }
    command_complete(out, tag);
}

pub(crate) fn command_complete(out: &mut BytesMut, tag: &str) {
    let _ = CommandComplete::new(tag.to_string()).encode(out);
}

pub(crate) fn error(out: &mut BytesMut, code: &str, message: &str, hint: Option<&str>) {
    let mut fields = vec![
        (b'S', "ERROR".to_string()),
        (b'V', "ERROR".to_string()),
        (b'C', code.to_string()),
        (b'M', message.to_string()),
    ];
    if let Some(hint) = hint {
        fields.push((b'H', hint.to_string()));
    }
    let _ = ErrorResponse::new(fields).encode(out);
}

pub(crate) fn notice(out: &mut BytesMut, message: &str) {
    let fields = vec![
        (b'S', "NOTICE".to_string()),
        (b'V', "NOTICE".to_string()),
        (b'C', "00000".to_string()),
        (b'M', message.to_string()),
    ];
    let _ = NoticeResponse::new(fields).encode(out);
}

pub(crate) fn ready(out: &mut BytesMut) {
    let _ = ReadyForQuery::new(TransactionStatus::Idle).encode(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_set_is_row_description_rows_and_command_complete() {
        let mut set = ResultSet::new(&[("name", Type::Text), ("n", Type::Int4)]);
        set.push(vec![v("a"), None]);
        let mut out = BytesMut::new();
        result_set(&mut out, &set, "SHOW");
        // T, D, C in order, each with its length.
        let mut tags = Vec::new();
        let mut rest = &out[..];
        while !rest.is_empty() {
            tags.push(rest[0]);
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            rest = &rest[1 + len..];
        }
        assert_eq!(tags, b"TDC");
        // The row: two fields, "a" then NULL.
        let row = &out[out.iter().position(|b| *b == b'D').unwrap_or(0)..];
        assert_eq!(&row[5..7], &[0, 2]);
        assert_eq!(&row[7..12], &[0, 0, 0, 1, b'a']);
        assert_eq!(&row[12..16], &[0xff, 0xff, 0xff, 0xff]);
    }
}
