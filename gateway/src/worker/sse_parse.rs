//! Incremental parser for an upstream's `text/event-stream` body: bytes in, `data:` payloads
//! out. Handles events split across reads, `\r\n` line endings and multi-line data.

use bytes::{Buf, BytesMut};

/// Accumulates bytes and yields complete event payloads.
#[derive(Default)]
pub struct SseParser {
    buf: BytesMut,
    data: String,
}

/// Largest event a well-behaved upstream sends; more means a broken peer.
const MAX_EVENT_BYTES: usize = 4 << 20;

impl SseParser {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete event's data, if one is buffered.
    pub fn next_event(&mut self) -> Result<Option<String>, String> {
        loop {
            let Some(nl) = self.buf.iter().position(|&b| b == b'\n') else {
                if self.buf.len() + self.data.len() > MAX_EVENT_BYTES {
                    return Err("upstream event too large".into());
                }
                return Ok(None);
            };
            let mut line = &self.buf[..nl];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            let line = std::str::from_utf8(line)
                .map_err(|_| "upstream event is not UTF-8".to_string())?
                .to_string();
            self.buf.advance(nl + 1);
            if line.is_empty() {
                if !self.data.is_empty() {
                    return Ok(Some(std::mem::take(&mut self.data)));
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("data:") {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
            }
            // Comments (":") and other fields (event:, id:, retry:) carry nothing we use.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_reads_crlf_and_comments() {
        let mut p = SseParser::default();
        p.push(b": keepalive\r\n\r\ndata: {\"a\"");
        assert_eq!(p.next_event().unwrap(), None);
        p.push(b":1}\r\n\r\ndata: x\ndata: y\n\ndata: [DONE]\n\n");
        assert_eq!(p.next_event().unwrap().as_deref(), Some("{\"a\":1}"));
        assert_eq!(p.next_event().unwrap().as_deref(), Some("x\ny"));
        assert_eq!(p.next_event().unwrap().as_deref(), Some("[DONE]"));
        assert_eq!(p.next_event().unwrap(), None);
    }
}
