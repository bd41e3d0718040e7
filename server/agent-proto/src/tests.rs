use std::io::Cursor;

use super::*;

fn exec() -> HostMsg {
    HostMsg::Exec {
        id: 7,
        argv: vec!["echo".into(), "héllo ✓".into()],
        env: vec![("FOO".into(), "bar".into())],
        cwd: Some("/tmp".into()),
        stdin: true,
    }
}

fn guest_msgs() -> Vec<GuestMsg> {
    vec![
        GuestMsg::Ready {
            version: "0.1.0".into(),
            kernel_us: 1,
            init_us: 2,
        },
        GuestMsg::Started { id: 1, pid: 42 },
        GuestMsg::Exited {
            id: 1,
            code: Some(3),
            signal: None,
            duration_us: 9,
        },
        GuestMsg::Failed {
            id: 2,
            message: "nope".into(),
        },
        GuestMsg::Pong { id: 3 },
        GuestMsg::Log {
            message: "hi".into(),
        },
    ]
}

fn stream_of_frames() -> (Vec<u8>, usize) {
    let mut bytes = encode_json(&exec()).unwrap();
    for m in guest_msgs() {
        bytes.extend(encode_json(&m).unwrap());
    }
    bytes.extend(encode_data(7, STREAM_STDOUT, b"out").unwrap());
    bytes.extend(encode_data(7, STREAM_STDIN, b"").unwrap());
    bytes.extend(encode_data(u64::MAX, STREAM_STDERR, &vec![0xAB; MAX_DATA]).unwrap());
    (bytes, 2 + guest_msgs().len() + 2)
}

#[test]
fn json_round_trip_and_wire_shape() {
    let bytes = encode_json(&exec()).unwrap();
    let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
    assert_eq!(len, bytes.len() - 4);
    assert_eq!(bytes[4], KIND_JSON);
    let v: serde_json::Value = serde_json::from_slice(&bytes[5..]).unwrap();
    assert_eq!(v["type"], "exec");
    assert_eq!(v["env"][0][0], "FOO");
    let frame = read_frame(&mut Cursor::new(bytes)).unwrap().unwrap();
    assert_eq!(frame.parse_json::<HostMsg>().unwrap().unwrap(), exec());
    for m in guest_msgs() {
        let f = read_frame(&mut Cursor::new(encode_json(&m).unwrap()))
            .unwrap()
            .unwrap();
        assert_eq!(f.parse_json::<GuestMsg>().unwrap().unwrap(), m);
    }
    let ping: HostMsg = serde_json::from_str(r#"{"type":"ping","id":5}"#).unwrap();
    assert_eq!(ping, HostMsg::Ping { id: 5 });
}

#[test]
fn data_round_trip() {
    let bytes = encode_data(0x0102030405060708, STREAM_STDERR, b"abc").unwrap();
    assert_eq!(bytes.len(), 4 + 1 + DATA_HEADER + 3);
    assert_eq!(bytes[4], KIND_DATA);
    assert_eq!(&bytes[5..13], &0x0102030405060708u64.to_le_bytes());
    let f = read_frame(&mut Cursor::new(bytes)).unwrap().unwrap();
    assert_eq!(
        f,
        Frame::Data {
            id: 0x0102030405060708,
            stream: STREAM_STDERR,
            data: b"abc".to_vec()
        }
    );
    assert!(f.parse_json::<GuestMsg>().is_none());
}

#[test]
fn encode_limits() {
    assert!(matches!(
        encode_data(1, STREAM_STDOUT, &vec![0; MAX_DATA + 1]),
        Err(ProtoError::DataTooLarge(_))
    ));
    assert!(matches!(
        encode_data(1, 4, b"x"),
        Err(ProtoError::BadStream(4))
    ));
    let huge = GuestMsg::Log {
        message: "x".repeat(MAX_FRAME),
    };
    assert!(matches!(encode_json(&huge), Err(ProtoError::TooLarge(_))));
}

#[test]
fn frame_reader_reads_all_then_none() {
    let (bytes, count) = stream_of_frames();
    let frames: Vec<Frame> = FrameReader::new(Cursor::new(bytes))
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(frames.len(), count);
}

#[test]
fn decoder_byte_by_byte_equals_whole() {
    let (bytes, count) = stream_of_frames();
    let whole: Vec<Frame> = FrameReader::new(Cursor::new(bytes.clone()))
        .collect::<Result<_, _>>()
        .unwrap();
    let mut dec = Decoder::new();
    let mut got = Vec::new();
    for b in &bytes {
        dec.push(std::slice::from_ref(b));
        while let Some(f) = dec.next() {
            got.push(f.unwrap());
        }
    }
    assert_eq!(got.len(), count);
    assert_eq!(got, whole);
    assert_eq!(dec.pending(), 0);
}

#[test]
fn decoder_odd_chunks() {
    let (bytes, count) = stream_of_frames();
    let mut dec = Decoder::new();
    let mut n = 0;
    for chunk in bytes.chunks(7777) {
        dec.push(chunk);
        while let Some(f) = dec.next() {
            f.unwrap();
            n += 1;
        }
    }
    assert_eq!(n, count);
}

#[test]
fn bad_lengths() {
    for len in [0u32, (MAX_FRAME + 2) as u32, u32::MAX] {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend([KIND_JSON, b'{']);
        assert!(matches!(
            read_frame(&mut Cursor::new(bytes.clone())),
            Err(ProtoError::BadLength(l)) if l == len
        ));
        let mut dec = Decoder::new();
        dec.push(&bytes);
        assert!(matches!(dec.next(), Some(Err(ProtoError::BadLength(_)))));
        dec.push(&encode_json(&HostMsg::Ping { id: 1 }).unwrap());
        assert!(matches!(dec.next(), Some(Err(ProtoError::Desynced))));
    }
    // The largest body is accepted.
    let mut big = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
    big.push(KIND_JSON);
    big.extend(vec![b' '; MAX_FRAME]);
    assert!(read_frame(&mut Cursor::new(big)).unwrap().is_some());
}

#[test]
fn bad_kind_is_skipped() {
    let mut bytes = 3u32.to_le_bytes().to_vec();
    bytes.extend([9, 1, 2]);
    bytes.extend(encode_json(&HostMsg::Ping { id: 4 }).unwrap());
    let mut r = Cursor::new(bytes.clone());
    assert!(matches!(read_frame(&mut r), Err(ProtoError::BadKind(9))));
    assert!(read_frame(&mut r).unwrap().is_some());
    assert!(read_frame(&mut r).unwrap().is_none());

    let mut dec = Decoder::new();
    dec.push(&bytes);
    assert!(matches!(dec.next(), Some(Err(ProtoError::BadKind(9)))));
    let ping = dec.next().unwrap().unwrap();
    assert_eq!(
        ping.parse_json::<HostMsg>().unwrap().unwrap(),
        HostMsg::Ping { id: 4 }
    );
    assert!(dec.next().is_none());
}

#[test]
fn bad_data_frames() {
    // Body shorter than the data header.
    let mut short = 5u32.to_le_bytes().to_vec();
    short.extend([KIND_DATA, 0, 0, 0, 0]);
    assert!(matches!(
        read_frame(&mut Cursor::new(short)),
        Err(ProtoError::ShortData(4))
    ));
    // Unknown stream.
    let mut bad = encode_data(1, STREAM_STDOUT, b"x").unwrap();
    bad[13] = 5;
    assert!(matches!(
        read_frame(&mut Cursor::new(bad)),
        Err(ProtoError::BadStream(5))
    ));
    // Too much data for one frame.
    let n = 1 + DATA_HEADER + MAX_DATA + 1;
    let mut big = (n as u32).to_le_bytes().to_vec();
    big.push(KIND_DATA);
    big.extend(vec![0; n - 1]);
    assert!(matches!(
        read_frame(&mut Cursor::new(big)),
        Err(ProtoError::DataTooLarge(_))
    ));
}

#[test]
fn truncated_stream() {
    let bytes = encode_json(&HostMsg::Ping { id: 1 }).unwrap();
    for cut in [2, 4, bytes.len() - 1] {
        assert!(matches!(
            read_frame(&mut Cursor::new(&bytes[..cut])),
            Err(ProtoError::Truncated { .. })
        ));
    }
}

#[test]
fn bad_json_reports_error() {
    let mut bytes = 3u32.to_le_bytes().to_vec();
    bytes.extend([KIND_JSON, b'{', b'}']);
    let f = read_frame(&mut Cursor::new(bytes)).unwrap().unwrap();
    assert!(matches!(
        f.parse_json::<HostMsg>(),
        Some(Err(ProtoError::Json(_)))
    ));
}

#[test]
fn file_messages_round_trip() {
    let host = vec![
        HostMsg::WriteFile {
            id: 1,
            path: "/a".into(),
            mode: 0o600,
            parents: true,
            exclusive: true,
        },
        HostMsg::ReadFile {
            id: 2,
            path: "/a".into(),
            offset: 3,
            length: 4,
            window: 65536,
        },
        HostMsg::FileAck { id: 2, bytes: 9 },
        HostMsg::FileAbort { id: 2 },
        HostMsg::StatFile {
            id: 3,
            path: "/".into(),
        },
        HostMsg::ListDir {
            id: 4,
            path: "/".into(),
        },
        HostMsg::RemoveFile {
            id: 5,
            path: "/a".into(),
            recursive: true,
        },
    ];
    for m in host {
        let f = read_frame(&mut Cursor::new(encode_json(&m).unwrap()))
            .unwrap()
            .unwrap();
        assert_eq!(f.parse_json::<HostMsg>().unwrap().unwrap(), m);
    }
    let info = FileInfo {
        name: "a".into(),
        size: 1,
        mode: 0o644,
        kind: FileKind::Symlink,
        mtime_ns: -1,
    };
    let guest = vec![
        GuestMsg::FileCredit { id: 1, bytes: 2 },
        GuestMsg::FileWritten {
            id: 1,
            size: 2,
            sha256: "ab".into(),
        },
        GuestMsg::FileOpened { id: 2, size: 3 },
        GuestMsg::FileRead {
            id: 2,
            bytes: 3,
            sha256: "cd".into(),
        },
        GuestMsg::FileFailed {
            id: 2,
            kind: FileErrorKind::NoSpace,
            message: "full".into(),
        },
        GuestMsg::FileStat {
            id: 3,
            info: info.clone(),
        },
        GuestMsg::DirListing {
            id: 4,
            entries: vec![info],
            truncated: false,
        },
        GuestMsg::FileRemoved { id: 5 },
    ];
    for m in guest {
        let f = read_frame(&mut Cursor::new(encode_json(&m).unwrap()))
            .unwrap()
            .unwrap();
        assert_eq!(f.parse_json::<GuestMsg>().unwrap().unwrap(), m);
    }
    // Wire shape: snake_case tags and kinds; defaults for optional fields.
    let v: serde_json::Value = serde_json::to_value(GuestMsg::FileFailed {
        id: 1,
        kind: FileErrorKind::AlreadyExists,
        message: String::new(),
    })
    .unwrap();
    assert_eq!(v["type"], "file_failed");
    assert_eq!(v["kind"], "already_exists");
    let w: HostMsg = serde_json::from_str(r#"{"type":"write_file","id":1,"path":"/x"}"#).unwrap();
    assert_eq!(
        w,
        HostMsg::WriteFile {
            id: 1,
            path: "/x".into(),
            mode: 0,
            parents: false,
            exclusive: false
        }
    );
}

#[test]
fn file_stream_data() {
    let bytes = encode_data(9, STREAM_FILE, b"f").unwrap();
    let f = read_frame(&mut Cursor::new(bytes)).unwrap().unwrap();
    assert_eq!(
        f,
        Frame::Data {
            id: 9,
            stream: STREAM_FILE,
            data: b"f".to_vec()
        }
    );
    assert_eq!(FILE_WRITE_WINDOW, 16 * MAX_DATA as u64);
}
