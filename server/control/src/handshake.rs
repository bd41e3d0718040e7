//! The VMM's first frame: [`crate::Event::Hello`] with its [`PROTOCOL_VERSION`],
//! and the daemon's check of it.

use crate::KIND_JSON;

/// The version of this protocol; see the crate doc ("Versions").
pub const PROTOCOL_VERSION: u32 = 2;

/// What a VMM said in its hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The protocol it speaks (equal to [`PROTOCOL_VERSION`] once checked).
    pub protocol: u32,
    /// Its own version; empty if it sent none.
    pub vmm_version: String,
}

/// Why a VMM's first frame does not open a session with this side.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// It speaks another version of the protocol.
    #[error(
        "it speaks control protocol {vmm}{}, this side speaks protocol {PROTOCOL_VERSION}",
        version_note(.vmm_version)
    )]
    Mismatch {
        /// The version it speaks.
        vmm: u32,
        /// Its own version, as it reported it.
        vmm_version: String,
    },
    /// Its first frame is no hello: it predates protocol versions, or it
    /// is not a forkd-vmm at all.
    #[error(
        "its first control frame is {first}, not a hello: it predates control protocol \
         versions (this side speaks protocol {PROTOCOL_VERSION})"
    )]
    NoHello {
        /// What the first frame was.
        first: String,
    },
}

fn version_note(vmm_version: &str) -> String {
    match vmm_version {
        "" => String::new(),
        v => format!(" (forkd-vmm {v})"),
    }
}

/// Checks a VMM's first frame (its kind and body, as [`crate::read_frame`]
/// returns them): it must be a hello speaking [`PROTOCOL_VERSION`].
///
/// Reads only the hello's `type`, `protocol` and `vmm_version` fields, so
/// the check works on the hello of any version, whatever else it carries.
pub fn check_hello(kind: u8, body: &[u8]) -> Result<Hello, HandshakeError> {
    if kind != KIND_JSON {
        return Err(HandshakeError::NoHello {
            first: format!("a frame of kind {kind}"),
        });
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| HandshakeError::NoHello {
            first: "not JSON".into(),
        })?;
    let field = |name: &str| value.get(name);
    match field("type").and_then(|t| t.as_str()) {
        Some("hello") => {}
        Some(other) => {
            return Err(HandshakeError::NoHello {
                first: format!("a {other:?} event"),
            })
        }
        None => {
            return Err(HandshakeError::NoHello {
                first: "JSON without a type".into(),
            })
        }
    }
    let vmm_version = field("vmm_version")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let protocol = field("protocol")
        .and_then(|p| p.as_u64())
        .and_then(|p| u32::try_from(p).ok())
        .ok_or_else(|| HandshakeError::NoHello {
            first: "a hello without a protocol version".into(),
        })?;
    if protocol != PROTOCOL_VERSION {
        return Err(HandshakeError::Mismatch {
            vmm: protocol,
            vmm_version,
        });
    }
    Ok(Hello {
        protocol,
        vmm_version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode_json, encode_output, read_frame, Event};

    fn check(frame: &[u8]) -> Result<Hello, HandshakeError> {
        let (kind, body) = read_frame(&mut &frame[..]).unwrap();
        check_hello(kind, &body)
    }

    #[test]
    fn hello_of_this_version_passes() {
        let hello = Event::hello("0.1.0");
        assert_eq!(
            hello,
            Event::Hello {
                protocol: PROTOCOL_VERSION,
                vmm_version: "0.1.0".into()
            }
        );
        assert_eq!(hello.request_id(), None);
        assert_eq!(
            check(&encode_json(&hello)),
            Ok(Hello {
                protocol: PROTOCOL_VERSION,
                vmm_version: "0.1.0".into()
            })
        );
    }

    #[test]
    fn other_version_is_refused_with_both_versions() {
        let newer = Event::Hello {
            protocol: PROTOCOL_VERSION + 1,
            vmm_version: "9.9.9".into(),
        };
        let err = check(&encode_json(&newer)).unwrap_err();
        assert_eq!(
            err,
            HandshakeError::Mismatch {
                vmm: PROTOCOL_VERSION + 1,
                vmm_version: "9.9.9".into()
            }
        );
        let text = err.to_string();
        assert!(
            text.contains(&format!("protocol {}", PROTOCOL_VERSION + 1))
                && text.contains("(forkd-vmm 9.9.9)")
                && text.contains(&format!("speaks protocol {PROTOCOL_VERSION}")),
            "{text}"
        );
    }

    #[test]
    fn a_future_hello_is_still_read() {
        // More fields, or fields of other types, do not hide the version.
        let body = br#"{"type":"hello","protocol":7,"features":["x"],"vmm_version":"2.0"}"#;
        assert_eq!(
            check_hello(KIND_JSON, body),
            Err(HandshakeError::Mismatch {
                vmm: 7,
                vmm_version: "2.0".into()
            })
        );
        let body = format!(r#"{{"type":"hello","protocol":{PROTOCOL_VERSION}}}"#);
        assert_eq!(
            check_hello(KIND_JSON, body.as_bytes()).map(|h| h.vmm_version),
            Ok(String::new())
        );
    }

    #[test]
    fn anything_else_first_is_no_hello() {
        let ready = encode_json(&Event::Ready {
            boot_us: 1,
            guest: None,
        });
        let err = check(&ready).unwrap_err();
        assert_eq!(
            err,
            HandshakeError::NoHello {
                first: "a \"ready\" event".into()
            }
        );
        assert!(err.to_string().contains("predates"), "{err}");
        assert!(matches!(
            check(&encode_output(1, 1, b"x")),
            Err(HandshakeError::NoHello { .. })
        ));
        for body in [
            &b"not json"[..],
            br#"{"protocol":1}"#,
            br#"{"type":"hello"}"#,
        ] {
            assert!(
                matches!(
                    check_hello(KIND_JSON, body),
                    Err(HandshakeError::NoHello { .. })
                ),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
