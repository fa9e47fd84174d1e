//! The gRPC port through grpcurl (by reflection and with the proto file) and through our own
//! tonic client, `grpc-call`.

use std::process::Output;

use mesh_tests::tools;
use serde_json::{Value, json};

use crate::{App, run, stdout, whoami};

const PROTO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");

fn grpcurl(args: &[&str]) -> Output {
    let grpcurl = tools::grpcurl().expect("grpcurl");
    run(&grpcurl, &[&["-plaintext", "-max-time", "20"], args].concat())
}

/// grpcurl prints each reply as an indented JSON object, one after the other.
fn replies(out: &Output) -> Vec<Value> {
    assert!(out.status.success(), "grpcurl failed: {out:?}");
    let text = stdout(out);
    serde_json::Deserializer::from_str(&text).into_iter::<Value>().map(|v| v.unwrap_or_else(|e| panic!("{e}: {text}"))).collect()
}

#[test]
fn grpcurl_finds_the_service_by_reflection() {
    let app = App::start();
    let addr = app.grpc_addr();
    let list = stdout(&grpcurl(&[&addr, "list"]));
    assert!(list.lines().any(|l| l == "whoami.v1.Whoami"), "{list}");
    let described = stdout(&grpcurl(&[&addr, "describe", "whoami.v1.Whoami"]));
    assert!(described.contains("rpc Chat ( stream .whoami.v1.ChatMessage ) returns ( stream .whoami.v1.ChatMessage );"), "{described}");
    let hello = replies(&grpcurl(&["-d", r#"{"name":"reflected"}"#, &addr, "whoami.v1.Whoami/Hello"]));
    assert_eq!(hello[0]["message"], "hello reflected", "{hello:?}");
}

#[test]
fn grpcurl_drives_every_rpc_kind_with_the_proto_file() {
    let app = App::start();
    let addr = app.grpc_addr();
    let call = |data: &str, method: &str, extra: &[&str]| {
        let args = [&["-import-path", PROTO_DIR, "-proto", "whoami.proto", "-d", data], extra, &[&addr, method]].concat();
        grpcurl(&args)
    };

    let hello = replies(&call(r#"{"name":"grpcurl"}"#, "whoami.v1.Whoami/Hello", &["-H", "x-canary: yes"]));
    let h = &hello[0];
    assert_eq!((&h["pod"], &h["node"], &h["version"], &h["message"]), (&json!("app-1"), &json!("n1"), &json!("v7"), &json!("hello grpcurl")));
    assert_eq!((&h["method"], &h["metadata"]["x-canary"]), (&json!("/whoami.v1.Whoami/Hello"), &json!("yes")), "{h}");
    assert_eq!(h["authority"], json!(addr), "{h}");
    assert!(h["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{h}");

    let counted = replies(&call(r#"{"n":4}"#, "whoami.v1.Whoami/Count", &[]));
    assert_eq!(counted.iter().map(|r| r["i"].as_u64()).collect::<Vec<_>>(), [Some(1), Some(2), Some(3), Some(4)], "{counted:?}");

    // Client streaming: grpcurl sends each JSON object of -d as one message. (Proto3 JSON
    // writes int64 as a string.)
    let sum = replies(&call(r#"{"value":40} {"value":2}"#, "whoami.v1.Whoami/Sum", &[]));
    assert_eq!((&sum[0]["sum"], &sum[0]["count"]), (&json!("42"), &json!(2)), "{sum:?}");

    let chat = replies(&call(r#"{"text":"a"} {"text":"b"}"#, "whoami.v1.Whoami/Chat", &[]));
    assert_eq!(chat, [json!({"text": "a", "pod": "app-1"}), json!({"text": "b", "pod": "app-1"})]);

    // A requested failure reaches the client as that status.
    let failed = call(r#"{"fail_code":14}"#, "whoami.v1.Whoami/Hello", &[]);
    let text = format!("{}{}", stdout(&failed), String::from_utf8_lossy(&failed.stderr));
    assert!(!failed.status.success() && text.contains("Code: Unavailable"), "{text}");

    let paths: Vec<String> = app.requests().into_iter().map(|s| s.path).collect();
    let method = |m: &str| format!("/whoami.v1.Whoami/{m}");
    assert_eq!(paths, [method("Hello"), method("Count"), method("Sum"), method("Chat"), method("Hello")]);
}

#[test]
fn grpc_failures_for_retry_and_outlier_tests() {
    let app = App::start();
    let addr = app.grpc_addr();
    // fail_times: only the first call with this name fails, the next one (a retry) succeeds.
    let hello = |data: &str| grpcurl(&["-d", data, &addr, "whoami.v1.Whoami/Hello"]);
    let flaky = r#"{"name":"retry-1","fail_code":14,"fail_times":1}"#;
    let first = hello(flaky);
    assert!(!first.status.success() && String::from_utf8_lossy(&first.stderr).contains("Code: Unavailable"), "{first:?}");
    assert_eq!(replies(&hello(flaky))[0]["message"], "hello retry-1");

    // A server started to fail every Hello.
    let bad = App::start_with(&["--grpc-fail-code", "14"]);
    let out = whoami(&["grpc-call", &bad.grpc_addr(), "hello"]);
    assert!(!out.status.success() && stdout(&out).starts_with("error: grpc code=14 (Unavailable) message=app-1"), "{out:?}");
    assert_eq!(whoami(&["grpc-call", &bad.grpc_addr(), "count", "--n", "2"]).status.code(), Some(0), "only Hello fails");
}

#[test]
fn grpc_call_is_a_second_client_for_the_same_service() {
    let app = App::start();
    let addr = app.grpc_addr();
    let lines = |args: &[&str]| -> Vec<Value> {
        let out = whoami(&[&["grpc-call", &addr], args].concat());
        assert!(out.status.success(), "{out:?}");
        stdout(&out).lines().map(|l| serde_json::from_str(l).expect("one JSON reply per line")).collect()
    };
    let hello = lines(&["hello", "--name", "tonic", "--metadata", "x-user=alice"]);
    assert_eq!((&hello[0]["message"], &hello[0]["metadata"]["x-user"]), (&json!("hello tonic"), &json!("alice")));
    assert_eq!(lines(&["count", "--n", "5"]).len(), 5);
    assert_eq!(lines(&["sum", "--n", "10"]), [json!({"sum": 55, "count": 10, "pod": "app-1"})]);
    assert_eq!(lines(&["chat", "--n", "4"]).len(), 4);

    let failed = whoami(&["grpc-call", &addr, "hello", "--fail-code", "14"]);
    assert!(!failed.status.success() && stdout(&failed).starts_with("error: grpc code=14 (Unavailable)"), "{failed:?}");
}
