//! `max_connections`: past it, new connections are closed at accept (and counted), while the
//! connections already admitted keep being served.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn chat() -> Vec<u8> {
    let body =
        br#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;
    raw_request("POST", "/v1/chat/completions", body, &[])
}

#[test]
fn connections_past_the_cap_are_closed_and_the_admitted_ones_served() {
    let sim = spawn_mock(&[]);
    let gw = spawn_gateway(&format!(
        "listen: \"{{listen}}\"\nworkers: 2\nmax_connections: 4\nbackends: [{{url: \"http://{}\"}}]\n",
        sim.addr
    ));
    // Four admitted connections, each proven served.
    let mut held: Vec<Client> = (0..4)
        .map(|_| {
            let mut c = Client::connect(gw.addr);
            c.send(&chat());
            assert_eq!(c.read_response().status, 200);
            c
        })
        .collect();
    // The fifth is closed without an answer.
    let mut fifth = TcpStream::connect(gw.addr).expect("the kernel completes the handshake");
    fifth
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = fifth.write_all(&chat());
    let mut buf = [0u8; 64];
    let read = fifth.read(&mut buf);
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a connection past max_connections was answered: {:?}",
        read.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    // The admitted ones keep working.
    for c in &mut held {
        c.send(&chat());
        assert_eq!(c.read_response().status, 200);
    }
    // Closing one makes room: the scrape gets in and shows the refusal.
    drop(held.pop());
    let mut text = String::new();
    // A scrape that arrives before the gateway has seen the close is refused, and counted too.
    let mut refused_scrapes = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            let Ok(mut s) = TcpStream::connect(gw.addr) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
            text.clear();
            let answered = s.read_to_string(&mut text).is_ok() && text.starts_with("HTTP/1.1 200");
            if !answered && text.is_empty() {
                refused_scrapes += 1;
            }
            answered
        }),
        "no room after a connection closed"
    );
    assert!(
        text.contains(&format!(
            "\nllmproxy_connections_refused_total {}\n",
            1 + refused_scrapes
        )),
        "{text}"
    );
    assert!(text.contains("\nllmproxy_connections_open 4\n"), "{text}");
}
