//! The wire codec against its contract: round trips of every message, exact decimals, and
//! refusal (never a panic, never a wrong frame) of arbitrary, mutated, truncated, oversized and
//! unknown input.

mod strategies;

use proptest::prelude::*;
use rust_decimal::Decimal;
use std::str::FromStr;
use tally_engine::*;
use tally_net::*;

fn encode(message: &Message, request_id: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    message.encode(request_id, &mut buf).expect("encodes");
    buf
}

/// Feeds `bytes` in chunks of `chunk` bytes and collects every decoded message.
fn decode_all(bytes: &[u8], chunk: usize) -> Result<Vec<(u64, Message)>, String> {
    let mut decoder = Decoder::default();
    let mut out = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        decoder.feed(piece);
        while let Some(frame) = decoder.next_frame().map_err(|e| e.to_string())? {
            let message = Message::decode(&frame).map_err(|e| e.to_string())?;
            out.push((frame.header.request_id, message));
        }
    }
    decoder.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

fn usage_event() -> UsageEvent {
    UsageEvent {
        wallet: name("w-1"),
        product: name("chat"),
        quantities: vec![Quantity {
            dimension: name("input_tokens"),
            value: Decimal::from(1200),
        }],
        attributes: vec![(name("model"), name("gpt-4o"))],
        cost_usd: Decimal::from_str("0.0031").unwrap(),
        occurred_at: Timestamp(1_700_000_000_000_000),
        mode: DebitMode::Strict,
    }
}

fn usage_request() -> Message {
    Message::Request(Request {
        id: RequestId(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
        command: Command::Usage(usage_event()),
    })
}

fn samples() -> Vec<Message> {
    vec![
        usage_request(),
        Message::Hello(Hello {
            version_min: 1,
            version_max: 1,
            frame_payload_max: 1 << 20,
            client: "test".into(),
        }),
        Message::UsageBatch(vec![
            (RequestId(1), usage_event()),
            (RequestId(2), usage_event()),
        ]),
        Message::Query(Query::Margin(MarginScope::Total)),
        Message::Snapshot,
        Message::BatchReply(vec![
            Ok(Reply {
                code: ResultCode::InsufficientFunds,
                value: ReplyValue::None,
            }),
            Err(ErrorCode::Busy),
        ]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every message survives encode → stream decode (in arbitrary chunk sizes) unchanged, with
    /// its request id, and re-encodes to the same bytes (so decimal scales are kept exactly).
    #[test]
    fn messages_round_trip(message in strategies::message(), id in any::<u64>(), chunk in 1usize..64) {
        let bytes = encode(&message, id);
        let decoded = decode_all(&bytes, chunk).map_err(TestCaseError::fail)?;
        prop_assert_eq!(decoded.len(), 1);
        prop_assert_eq!(decoded[0].0, id);
        prop_assert_eq!(&decoded[0].1, &message);
        prop_assert_eq!(encode(&decoded[0].1, id), bytes);
    }

    /// Pipelined frames in one stream come out in order with their ids.
    #[test]
    fn pipelined_frames_keep_order(messages in proptest::collection::vec(strategies::message(), 1..6)) {
        let mut bytes = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            m.encode(i as u64, &mut bytes).unwrap();
        }
        let decoded = decode_all(&bytes, 7).map_err(TestCaseError::fail)?;
        prop_assert_eq!(decoded.len(), messages.len());
        for (i, (id, m)) in decoded.iter().enumerate() {
            prop_assert_eq!(*id, i as u64);
            prop_assert_eq!(m, &messages[i]);
        }
    }

    /// Arbitrary bytes never panic the decoder or the payload decoder; half the cases start
    /// with a valid magic and version so the rest of the header is exercised too.
    #[test]
    fn arbitrary_bytes_never_panic(
        mut bytes in proptest::collection::vec(any::<u8>(), 2..512),
        framed in any::<bool>(),
    ) {
        if framed {
            bytes[0] = MAGIC;
            bytes[1] = PROTOCOL_VERSION;
        }
        let mut decoder = Decoder::default();
        decoder.feed(&bytes);
        while let Ok(Some(frame)) = decoder.next_frame() {
            let _ = Message::decode(&frame);
        }
    }

    /// Arbitrary payloads under every frame kind never panic, and bytes after a valid header
    /// with a random kind either decode or name a field.
    #[test]
    fn arbitrary_payloads_never_panic(
        kind in prop::sample::select(Kind::ALL),
        payload in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = Vec::new();
        frame::encode_header(&mut bytes, kind, 9, payload.len() as u32);
        bytes.extend_from_slice(&payload);
        let mut decoder = Decoder::default();
        decoder.feed(&bytes);
        let frame = decoder.next_frame().unwrap().unwrap();
        if let Err(e) = Message::decode(&frame) {
            prop_assert!(!e.field.is_empty());
        }
    }

    /// A valid stream with bytes flipped never panics; whatever decodes is a well-formed message
    /// that encodes back to the bytes it came from.
    #[test]
    fn mutated_frames_never_panic(
        message in strategies::message(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = encode(&message, 5);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= value | 1;
        }
        let mut decoder = Decoder::default();
        decoder.feed(&bytes);
        while let Ok(Some(frame)) = decoder.next_frame() {
            if let Ok(m) = Message::decode(&frame) {
                let mut again = Vec::new();
                m.encode(frame.header.request_id, &mut again).unwrap();
                prop_assert_eq!(&again[HEADER_BYTES..], frame.payload);
            }
        }
    }

    /// Every strict prefix of a frame is "need more bytes" (and a truncation at the end of the
    /// stream); every strict prefix of a payload, under an honest length, is a field error.
    #[test]
    fn truncation_never_yields_a_frame(message in strategies::message()) {
        let bytes = encode(&message, 77);
        for cut in 0..bytes.len() {
            let mut decoder = Decoder::default();
            decoder.feed(&bytes[..cut]);
            prop_assert!(decoder.next_frame().unwrap().is_none(), "frame from {} of {} bytes", cut, bytes.len());
            if cut > 0 {
                prop_assert_eq!(decoder.finish(), Err(DecodeError::Truncated { buffered: cut }));
            }
        }
        for cut in 0..bytes.len() - HEADER_BYTES {
            let mut short = Vec::new();
            frame::encode_header(&mut short, message.kind(), 77, cut as u32);
            short.extend_from_slice(&bytes[HEADER_BYTES..HEADER_BYTES + cut]);
            let mut decoder = Decoder::default();
            decoder.feed(&short);
            let frame = decoder.next_frame().unwrap().unwrap();
            prop_assert!(Message::decode(&frame).is_err(), "payload prefix of {} bytes decoded", cut);
        }
    }
}

#[test]
fn decimals_are_exact_at_the_limits_and_keep_their_scale() {
    let cases = [
        Decimal::MAX,
        Decimal::MIN,
        Decimal::ZERO,
        Decimal::from_str("1.10").unwrap(),
        Decimal::from_str("-0.0000025").unwrap(),
        Decimal::from_str("0.0000000000000000000000000001").unwrap(),
        Decimal::from_str("1000000000000000000").unwrap(),
    ];
    for value in cases {
        let message = Message::Request(Request {
            id: RequestId(1),
            command: Command::SetOverdraft {
                wallet: name("w"),
                asset: asset("USD"),
                limit: value,
            },
        });
        let decoded = decode_all(&encode(&message, 1), 3).unwrap();
        let Message::Request(Request {
            command: Command::SetOverdraft { limit, .. },
            ..
        }) = decoded[0].1
        else {
            panic!("wrong message {:?}", decoded[0].1);
        };
        assert_eq!(limit, value);
        assert_eq!(limit.scale(), value.scale(), "{value}");
        assert_eq!(limit.to_string(), value.to_string());
    }
    // 1.10 on the wire: mantissa 110, scale 2.
    let mut buf = Vec::new();
    codec::Writer::new(&mut buf).decimal(&Decimal::from_str("1.10").unwrap());
    let mut expected = 110i128.to_le_bytes().to_vec();
    expected.push(2);
    assert_eq!(buf, expected);
    assert_eq!(buf.len(), DECIMAL_BYTES);
}

#[test]
fn invalid_decimals_and_names_are_refused_by_field() {
    // Scale 29.
    let mut bytes = 1i128.to_le_bytes().to_vec();
    bytes.push(29);
    let error = codec::Reader::new(&bytes).decimal("x.amount").unwrap_err();
    assert_eq!(error.field, "x.amount");
    assert_eq!(error.problem, Problem::InvalidDecimal);
    // Mantissa of 2^96, one past what a Decimal holds; and its negative.
    for m in [1i128 << 96, -(1i128 << 96), i128::MIN, i128::MAX] {
        let mut bytes = m.to_le_bytes().to_vec();
        bytes.push(0);
        let error = codec::Reader::new(&bytes).decimal("x.amount").unwrap_err();
        assert_eq!(error.problem, Problem::InvalidDecimal);
    }
    // (2^96 - 1) is Decimal::MAX.
    let mut bytes = ((1i128 << 96) - 1).to_le_bytes().to_vec();
    bytes.push(0);
    assert_eq!(
        codec::Reader::new(&bytes).decimal("x").unwrap(),
        Decimal::MAX
    );

    // A wallet name of 65 bytes inside a usage event: the wire allows 255, the engine 64.
    let long = "a".repeat(65);
    let mut payload = 7u128.to_le_bytes().to_vec();
    payload.push(65);
    payload.extend_from_slice(long.as_bytes());
    let frame = one_frame(Kind::Usage, &payload);
    let error = decode_frame(&frame).unwrap_err();
    assert_eq!(error.field, "usage.wallet");
    assert_eq!(error.problem, Problem::Name(NameError::TooLong(64)));
    assert!(error.to_string().contains("usage.wallet"), "{error}");

    // Empty name, control character, invalid UTF-8.
    for (bytes, problem) in [
        (&b""[..], Problem::Name(NameError::Empty)),
        (&b"a\nb"[..], Problem::Name(NameError::ControlCharacter)),
        (&[0xff, 0xfe][..], Problem::InvalidUtf8),
    ] {
        let mut payload = vec![bytes.len() as u8];
        payload.extend_from_slice(bytes);
        let error = decode_frame(&one_frame(Kind::QueryWallet, &payload)).unwrap_err();
        assert_eq!(error.field, "query_wallet.wallet");
        assert_eq!(error.problem, problem);
    }

    // Asset codes hold 16 bytes.
    let mut payload = vec![1, b'w', 17];
    payload.extend_from_slice(&[b'A'; 17]);
    let error = decode_frame(&one_frame(Kind::QueryBalance, &payload)).unwrap_err();
    assert_eq!(error.field, "query_balance.asset");
    assert_eq!(error.problem, Problem::Name(NameError::TooLong(16)));
}

fn one_frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    frame::encode_header(&mut bytes, kind, 1, payload.len() as u32);
    bytes.extend_from_slice(payload);
    bytes
}

fn decode_frame(bytes: &[u8]) -> Result<Message, BodyError> {
    let mut decoder = Decoder::default();
    decoder.feed(bytes);
    let frame = decoder.next_frame().unwrap().unwrap();
    Message::decode(&frame)
}

#[test]
fn header_layout_is_as_documented() {
    let bytes = encode(&Message::Health, 0x0102_0304_0506_0708);
    assert_eq!(
        bytes,
        [0x74, 1, 0x53, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1],
        "magic, version, kind, flags, length 0, request id little-endian"
    );
}

#[test]
fn oversized_frames_are_refused_at_the_header() {
    let mut header = Vec::new();
    frame::encode_header(
        &mut header,
        Kind::UsageBatch,
        1,
        FRAME_PAYLOAD_BYTES_MAX + 1,
    );
    let mut decoder = Decoder::default();
    decoder.feed(&header);
    let error = DecodeError::TooLarge {
        length: FRAME_PAYLOAD_BYTES_MAX + 1,
        max: FRAME_PAYLOAD_BYTES_MAX,
    };
    assert_eq!(decoder.next_frame().unwrap_err(), error);
    // The decoder stays failed and buffered only the header.
    decoder.feed(&[0; 100]);
    assert_eq!(decoder.next_frame().unwrap_err(), error);
    assert_eq!(decoder.finish(), Err(error));

    // A smaller negotiated limit applies the same way.
    let mut decoder = Decoder::new(1000);
    let mut header = Vec::new();
    frame::encode_header(&mut header, Kind::Usage, 1, 1001);
    decoder.feed(&header);
    assert_eq!(
        decoder.next_frame().unwrap_err(),
        DecodeError::TooLarge {
            length: 1001,
            max: 1000
        }
    );
    // u32::MAX announced: refused, nothing reserved.
    let mut header = Vec::new();
    frame::encode_header(&mut header, Kind::Usage, 1, u32::MAX);
    let mut decoder = Decoder::default();
    decoder.feed(&header);
    assert!(matches!(
        decoder.next_frame(),
        Err(DecodeError::TooLarge { .. })
    ));
    assert_eq!(decoder.buffered(), HEADER_BYTES);
}

#[test]
fn lying_counts_are_refused_before_allocating() {
    // A usage batch claiming 65,535 items in 2 bytes of payload.
    let error = decode_frame(&one_frame(Kind::UsageBatch, &[0xff, 0xff])).unwrap_err();
    assert_eq!(error.field, "usage_batch.items");
    assert_eq!(error.problem, Problem::CountTooLarge(65535));
    // A draft test claiming 4 billion events.
    let mut payload = vec![1, b'p'];
    payload.extend_from_slice(&u32::MAX.to_le_bytes());
    let error = decode_frame(&one_frame(Kind::QueryDraftTest, &payload)).unwrap_err();
    assert_eq!(error.problem, Problem::CountTooLarge(u32::MAX));
}

#[test]
fn unknown_magic_version_kind_and_flags_are_refused() {
    let good = encode(&usage_request(), 3);
    let cases = [
        (0, 0x00, DecodeError::BadMagic(0x00)),
        (1, 2, DecodeError::UnsupportedVersion(2)),
        (1, 0, DecodeError::UnsupportedVersion(0)),
        (2, 0x7f, DecodeError::UnknownKind(0x7f)),
        (2, 0x00, DecodeError::UnknownKind(0x00)),
        (3, 0x01, DecodeError::UnknownFlags(0x01)),
    ];
    for (offset, value, expected) in cases {
        let mut bytes = good.clone();
        bytes[offset] = value;
        let mut decoder = Decoder::default();
        decoder.feed(&bytes);
        assert_eq!(decoder.next_frame().unwrap_err(), expected);
    }
    // A foreign stream is refused at its first byte.
    let mut decoder = Decoder::default();
    decoder.feed(b"G");
    assert_eq!(
        decoder.next_frame().unwrap_err(),
        DecodeError::BadMagic(b'G')
    );
    // Every byte value that is not a kind is refused.
    for n in 0..=u8::MAX {
        assert_eq!(
            Kind::from_u8(n).is_some(),
            Kind::ALL.iter().any(|k| *k as u8 == n)
        );
    }
}

#[test]
fn unknown_tags_and_codes_are_refused() {
    // Reply with result code 999 (not a code) and with value tag 8 (not a tag).
    let error = decode_frame(&one_frame(Kind::Reply, &[0xe7, 0x03, 0])).unwrap_err();
    assert_eq!(error.problem, Problem::UnknownCode(999));
    let error = decode_frame(&one_frame(Kind::Reply, &[0, 0, 8])).unwrap_err();
    assert_eq!(error.problem, Problem::UnknownTag(8));
    // Error frame with code 1999.
    let error = decode_frame(&one_frame(Kind::Error, &[0xcf, 0x07, 0, 0])).unwrap_err();
    assert_eq!(error.problem, Problem::UnknownCode(1999));
    // Trailing bytes after a complete message.
    let error = decode_frame(&one_frame(Kind::Snapshot, &[0])).unwrap_err();
    assert_eq!(error.problem, Problem::TrailingBytes(1));
}

#[test]
fn every_command_and_query_has_its_own_opcode() {
    use std::collections::HashSet;
    let commands = [
        Kind::DefineAsset,
        Kind::DefineProduct,
        Kind::DraftPlan,
        Kind::PublishPlan,
        Kind::CreateWallet,
        Kind::SetOverdraft,
        Kind::Freeze,
        Kind::Unfreeze,
        Kind::AssignPlan,
        Kind::Grant,
        Kind::Usage,
        Kind::Reserve,
        Kind::Settle,
        Kind::Release,
        Kind::Refund,
        Kind::Dispute,
        Kind::DisputeWon,
        Kind::Adjust,
        Kind::SetTopUpRule,
        Kind::RemoveTopUpRule,
        Kind::TopUpSucceeded,
        Kind::TopUpFailed,
    ];
    let numbers: HashSet<u8> = Kind::ALL.iter().map(|k| *k as u8).collect();
    assert_eq!(numbers.len(), Kind::ALL.len());
    for k in commands {
        assert!((0x10..0x30).contains(&(k as u8)), "{k}");
    }
    // Stable numbers: a change here breaks every client.
    assert_eq!(Kind::Usage as u8, 0x1a);
    assert_eq!(Kind::UsageBatch as u8, 0x30);
    assert_eq!(Kind::BatchReply as u8, 0x81);
    assert!(!Kind::Usage.admin_only() && !Kind::Settle.admin_only());
    assert!(!Kind::UsageBatch.admin_only() && !Kind::QueryBalance.admin_only());
    assert!(Kind::Grant.admin_only() && Kind::KeyCreate.admin_only());
}

#[test]
fn error_codes_do_not_overlap_result_codes() {
    for code in ResultCode::ALL {
        assert!((*code as u16) < ERROR_CODE_MIN, "{code}");
    }
    let mut seen = std::collections::HashSet::new();
    for code in ErrorCode::ALL {
        assert!(*code as u16 >= ERROR_CODE_MIN);
        assert!(seen.insert(*code as u16));
        assert_eq!(ErrorCode::from_u16(*code as u16), Some(*code));
    }
    assert_eq!(ErrorCode::Busy as u16, 1007);
}

#[test]
fn encoding_over_the_limit_leaves_the_buffer_unchanged() {
    let mut buf = vec![1, 2, 3];
    let batch = Message::UsageBatch((0..100).map(|i| (RequestId(i), usage_event())).collect());
    let error = batch.encode_limited(1, 1000, &mut buf).unwrap_err();
    assert!(
        matches!(error, EncodeError::TooLarge { max: 1000, .. }),
        "{error}"
    );
    assert_eq!(buf, [1, 2, 3]);
    // A reason longer than its u16 prefix.
    let adjust = Message::Request(Request {
        id: RequestId(1),
        command: Command::Adjust {
            wallet: name("w"),
            asset: asset("USD"),
            amount: Decimal::ONE,
            reason: "x".repeat(70_000),
        },
    });
    assert_eq!(
        adjust.encode(1, &mut buf),
        Err(EncodeError::TooLong {
            field: "adjust.reason",
            length: 70_000
        })
    );
    assert_eq!(buf, [1, 2, 3]);
}

#[test]
fn a_batch_reply_answers_each_item_in_order() {
    let batch = Message::UsageBatch((0..300).map(|i| (RequestId(i), usage_event())).collect());
    let bytes = encode(&batch, 42);
    let decoded = decode_all(&bytes, 1500).unwrap();
    let Message::UsageBatch(items) = &decoded[0].1 else {
        panic!("not a batch");
    };
    assert_eq!(items.len(), 300);
    assert!(items
        .iter()
        .enumerate()
        .all(|(i, (id, _))| id.0 == i as u128));
    let outcomes: Vec<Outcome> = (0..300)
        .map(|i| match i % 3 {
            0 => Ok(Reply {
                code: ResultCode::Ok,
                value: ReplyValue::Charge {
                    asset: asset("USD"),
                    charged: Decimal::from_str("0.0030").unwrap(),
                    debt_added: Decimal::ZERO,
                    available: Decimal::from_str("9.9970").unwrap(),
                },
            }),
            1 => Ok(Reply {
                code: ResultCode::InsufficientFunds,
                value: ReplyValue::Shortfall {
                    asset: asset("USD"),
                    spendable: Decimal::ONE,
                    required: Decimal::TWO,
                },
            }),
            _ => Err(ErrorCode::Busy),
        })
        .collect();
    let reply = Message::BatchReply(outcomes);
    assert_eq!(
        decode_all(&encode(&reply, 42), 9).unwrap(),
        vec![(42, reply)]
    );
    // Reserve batch items become engine requests.
    let item = ReserveItem {
        id: RequestId(9),
        wallet: name("w"),
        amount: ReserveAmount::Fixed {
            asset: asset("USD"),
            amount: Decimal::ONE,
        },
        deadline: Timestamp(5),
    };
    let request = Request::from(item);
    assert_eq!(command_kind(&request.command), Kind::Reserve);
}

#[test]
fn samples_decode_after_every_split_point() {
    let mut stream = Vec::new();
    for (i, m) in samples().iter().enumerate() {
        m.encode(i as u64, &mut stream).unwrap();
    }
    for split in 0..=stream.len() {
        let mut decoder = Decoder::default();
        let mut got = Vec::new();
        for part in [&stream[..split], &stream[split..]] {
            decoder.feed(part);
            while let Some(frame) = decoder.next_frame().unwrap() {
                got.push(Message::decode(&frame).unwrap());
            }
        }
        decoder.finish().unwrap();
        assert_eq!(got, samples());
    }
}

#[test]
fn engine_answers_convert_at_the_edge() {
    let mut engine = Engine::new(Config::default());
    let now = Timestamp(1_700_000_000_000_000);
    let usd = asset("USD");
    let commands = [
        Command::DefineAsset {
            code: usd,
            scale: 6,
            usd_value: Decimal::ONE,
        },
        Command::CreateWallet(CreateWallet {
            wallet: name("w"),
            overdraft: vec![],
            metadata: vec![(name("tier"), name("pro"))],
        }),
        Command::Grant(Grant {
            wallet: name("w"),
            asset: usd,
            amount: Decimal::from(10),
            priority: 0,
            effective_at: None,
            expires_at: None,
            source: GrantSource::Promotion,
        }),
        Command::Reserve {
            wallet: name("w"),
            amount: ReserveAmount::Fixed {
                asset: usd,
                amount: Decimal::from_str("2.50").unwrap(),
            },
            deadline: now.add_us(Timestamp::HOUR_US),
        },
    ];
    for (i, command) in commands.into_iter().enumerate() {
        let reply = engine.handle_request(
            now,
            &Request {
                id: RequestId(i as u128),
                command,
            },
        );
        assert!(reply.code.is_ok(), "{reply:?}");
    }
    let reply = engine.query(&Query::Wallet { wallet: name("w") }).unwrap();
    let answer = Answer::from(&reply);
    let Answer::Wallet(info) = &answer else {
        panic!("not a wallet answer");
    };
    assert_eq!(info.holds.len(), 1);
    assert_eq!(info.holds[0].amount.to_string(), "2.50");
    assert_eq!(
        info.balances[0].available,
        Decimal::from_str("7.5").unwrap()
    );
    let message = Message::Answer(Ok(answer));
    assert_eq!(
        decode_all(&encode(&message, 1), 11).unwrap(),
        vec![(1, message)]
    );

    let refused = engine.query(&Query::Wallet {
        wallet: name("nobody"),
    });
    let message = Message::Answer(refused.as_ref().map(Answer::from).map_err(|c| *c));
    assert_eq!(message, Message::Answer(Err(ResultCode::UnknownWallet)));
    assert_eq!(
        decode_all(&encode(&message, 2), 1).unwrap(),
        vec![(2, message)]
    );
}

/// The usage example of docs/protocol.md §5.1, byte for byte.
#[test]
fn documented_usage_example_is_exact() {
    let message = Message::Request(Request {
        id: RequestId(7),
        command: Command::Usage(UsageEvent {
            wallet: name("w1"),
            ..usage_event()
        }),
    });
    let hex = "74 01 1a 00 61 00 00 00 01 00 00 00 00 00 00 00
        07 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
        02 77 31 04 63 68 61 74 01 00
        0c 69 6e 70 75 74 5f 74 6f 6b 65 6e 73
        b0 04 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
        01 00 05 6d 6f 64 65 6c 06 67 70 74 2d 34 6f
        1f 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 04
        00 40 1e 18 24 0a 06 00 00";
    let expected: Vec<u8> = hex
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    assert_eq!(encode(&message, 1), expected);
}

/// docs/protocol.md lists every frame kind, result code and error code with its number.
#[test]
fn protocol_document_lists_every_number() {
    let doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"));
    for kind in Kind::ALL {
        let row = format!("| 0x{:02x} | {} |", *kind as u8, kind.name());
        assert!(doc.contains(&row), "missing {row}");
    }
    for code in ResultCode::ALL {
        let row = format!("| {} | {} |", *code as u16, code.name());
        assert!(doc.contains(&row), "missing {row}");
    }
    for code in ErrorCode::ALL {
        let row = format!("| {} | {} |", *code as u16, code.name());
        assert!(doc.contains(&row), "missing {row}");
    }
    assert_eq!(FRAME_PAYLOAD_BYTES_MAX, 8_388_608);
    assert!(doc.contains("8,388,608"));
}

#[test]
fn version_negotiation_and_conversions() {
    let hello = |version_min, version_max| Hello {
        version_min,
        version_max,
        frame_payload_max: 0,
        client: String::new(),
    };
    assert_eq!(hello(1, 1).choose_version(PROTOCOL_VERSIONS), Some(1));
    assert_eq!(hello(1, 5).choose_version(PROTOCOL_VERSIONS), Some(1));
    assert_eq!(hello(1, 5).choose_version(1..=3), Some(3));
    assert_eq!(hello(2, 5).choose_version(PROTOCOL_VERSIONS), None);
    assert_eq!(hello(0, 0).choose_version(PROTOCOL_VERSIONS), None);
    assert_eq!(hello(3, 2).choose_version(1..=5), None);

    let message = usage_request();
    let request = Request::try_from(message.clone()).unwrap();
    assert_eq!(Message::from(request), message);
    assert_eq!(Request::try_from(Message::Health), Err(Kind::Health));
    let refused: Result<QueryReply, ResultCode> = Err(ResultCode::UnknownWallet);
    assert_eq!(
        Message::from(refused),
        Message::Answer(Err(ResultCode::UnknownWallet))
    );
    // An answer "refused with Ok" is not a message.
    let mut buf = Vec::new();
    assert_eq!(
        Message::Answer(Err(ResultCode::Ok)).encode(1, &mut buf),
        Err(EncodeError::Invalid {
            field: "answer.code"
        })
    );
    assert!(buf.is_empty());
}
