//! The head of an HTTP/1.1 message as Firecracker's API socket speaks it:
//! a start line, headers, a blank line, then `Content-Length` bytes of body.
//! Fed line by line by whoever reads the socket (the daemon's client reads
//! responses, the test fake reads requests), so both parse it one way.

/// A message head once its blank line arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// `PUT /machine-config HTTP/1.1` or `HTTP/1.1 204 No Content`.
    pub start: String,
    pub content_length: usize,
}

impl Head {
    /// The status code of a response's start line.
    pub fn status(&self) -> Option<u16> {
        self.start.split_whitespace().nth(1)?.parse().ok()
    }

    /// The method and path of a request's start line.
    pub fn method_and_path(&self) -> Option<(&str, &str)> {
        let mut parts = self.start.split_whitespace();
        Some((parts.next()?, parts.next()?))
    }
}

/// Collects a head from the lines read so far.
#[derive(Debug, Default)]
pub struct HeadReader {
    start: Option<String>,
    content_length: usize,
}

impl HeadReader {
    /// Takes the next line (with or without its line ending); the head once
    /// the line ending the headers arrived.
    pub fn line(&mut self, line: &str) -> Option<Head> {
        let line = line.trim_end_matches(['\r', '\n']);
        let Some(start) = &self.start else {
            self.start = Some(line.to_string());
            return None;
        };
        if line.is_empty() {
            return Some(Head {
                start: start.clone(),
                content_length: self.content_length,
            });
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                self.content_length = value.trim().parse().unwrap_or(0);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Head {
        let mut reader = HeadReader::default();
        text.split_inclusive('\n')
            .find_map(|l| reader.line(l))
            .expect("a complete head")
    }

    #[test]
    fn responses_and_requests_read_alike() {
        let head = read("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\ncontent-length: 42\r\n\r\n{…}");
        assert_eq!(head.status(), Some(400));
        assert_eq!(head.content_length, 42);
        let head = read("PUT /boot-source HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(head.method_and_path(), Some(("PUT", "/boot-source")));
        assert_eq!(head.content_length, 0);
        assert_eq!(read("garbage\r\n\r\n").status(), None);
    }
}
