//! banger's DNS server at the gateway: `NAME.<domain>` is each running VM's
//! address and `host.<domain>` the gateway; every other query is relayed to
//! the host's own resolvers.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record, RecordType};

/// Seconds a VM answer may be cached: VMs come and go.
const TTL: u32 = 5;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// Looks a short name (`web`, `host`) up; none when no such VM runs.
pub type Lookup = Arc<dyn Fn(&str) -> Option<Ipv4Addr> + Send + Sync>;

/// The reply to `packet` when it asks about `domain`; none when the query
/// belongs upstream (or is not a query at all).
pub fn answer(packet: &[u8], domain: &str, lookup: &Lookup) -> Option<Vec<u8>> {
    let query = Message::from_vec(packet).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let question = query.queries.first()?.clone();
    let name = question.name().to_lowercase().to_ascii();
    let name = name.trim_end_matches('.');
    let label = if name == domain {
        ""
    } else {
        name.strip_suffix(domain)?.strip_suffix('.')?
    };
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(question.clone());
    match (label, lookup(label)) {
        ("", _) => {}
        (_, Some(ip)) => {
            if matches!(question.query_type(), RecordType::A | RecordType::ANY) {
                reply.add_answer(Record::from_rdata(
                    question.name().clone(),
                    TTL,
                    RData::A(A(ip)),
                ));
            }
        }
        (_, None) => reply.metadata.response_code = ResponseCode::NXDomain,
    }
    reply.to_vec().ok()
}

/// Nameservers from a resolv.conf, minus `skip` (our own address).
pub fn upstreams(resolv_conf: &str, skip: Ipv4Addr) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .filter(|a| *a != std::net::IpAddr::V4(skip))
        .map(|a| SocketAddr::new(a, 53))
        .collect()
}

async fn relay(packet: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for upstream in upstreams {
        let bind: SocketAddr = if upstream.is_ipv4() {
            "0.0.0.0:0".parse().expect("valid")
        } else {
            "[::]:0".parse().expect("valid")
        };
        let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.send_to(packet, upstream).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv(&mut buf)).await {
            buf.truncate(n);
            return Some(buf);
        }
    }
    None
}

/// Serves UDP queries on `socket` until the daemon exits.
pub async fn serve(
    socket: tokio::net::UdpSocket,
    domain: String,
    lookup: Lookup,
    upstreams: Vec<SocketAddr>,
) {
    let socket = Arc::new(socket);
    let upstreams = Arc::new(upstreams);
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let packet = buf[..n].to_vec();
        if let Some(reply) = answer(&packet, &domain, &lookup) {
            let _ = socket.send_to(&reply, from).await;
            continue;
        }
        let (socket, upstreams) = (socket.clone(), upstreams.clone());
        tokio::spawn(async move {
            if let Some(reply) = relay(&packet, &upstreams).await {
                let _ = socket.send_to(&reply, from).await;
            }
        });
    }
}

/// Asks `server` for `name`'s A record over UDP: what `doctor` uses to see
/// that banger's own server answers on its port.
pub fn probe(server: SocketAddr, name: &str) -> Result<Option<Ipv4Addr>, super::NetError> {
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    let mut query = Message::query();
    query.metadata.id = 4242;
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(
        Name::from_ascii(name).map_err(|e| e.to_string())?,
        RecordType::A,
    ));
    let socket = std::net::UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    socket
        .send_to(&query.to_vec().map_err(|e| e.to_string())?, server)
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let n = socket
        .recv(&mut buf)
        .map_err(|e| format!("no answer from {server}: {e}"))?;
    let reply = Message::from_vec(&buf[..n]).map_err(|e| e.to_string())?;
    Ok(reply.answers.iter().find_map(|r| match r.data {
        RData::A(A(ip)) => Some(ip),
        _ => None,
    }))
}

/// The same answers over TCP (RFC 7766: each message after a 2-byte length),
/// for resolvers that retry truncated replies or prefer TCP.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    domain: String,
    lookup: Lookup,
    upstreams: Vec<SocketAddr>,
) {
    let upstreams = Arc::new(upstreams);
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let (domain, lookup, upstreams) = (domain.clone(), lookup.clone(), upstreams.clone());
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let idle = std::time::Duration::from_secs(10);
                let Ok(Ok(len)) = tokio::time::timeout(idle, conn.read_u16()).await else {
                    return;
                };
                let mut packet = vec![0u8; len as usize];
                if conn.read_exact(&mut packet).await.is_err() {
                    return;
                }
                let reply = match answer(&packet, &domain, &lookup) {
                    Some(r) => Some(r),
                    None => relay(&packet, &upstreams).await,
                };
                let Some(reply) = reply else { return };
                let Ok(len) = u16::try_from(reply.len()) else {
                    return;
                };
                if conn.write_u16(len).await.is_err() || conn.write_all(&reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn ask(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 77;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    fn lookup() -> Lookup {
        Arc::new(|label| match label {
            "web" => Some(Ipv4Addr::new(10, 213, 0, 2)),
            "host" => Some(Ipv4Addr::new(10, 213, 0, 1)),
            _ => None,
        })
    }

    #[test]
    fn vm_names_are_answered_and_others_go_upstream() {
        let reply = answer(&ask("Web.vm.", RecordType::A), "vm", &lookup()).unwrap();
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.metadata.id, 77);
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            reply.answers[0].data,
            RData::A(A(Ipv4Addr::new(10, 213, 0, 2)))
        );
        let host =
            Message::from_vec(&answer(&ask("host.vm", RecordType::A), "vm", &lookup()).unwrap())
                .unwrap();
        assert_eq!(host.answers.len(), 1);
        // A name that exists has no AAAA: an empty success, not NXDOMAIN.
        let v6 =
            Message::from_vec(&answer(&ask("web.vm", RecordType::AAAA), "vm", &lookup()).unwrap())
                .unwrap();
        assert!(v6.answers.is_empty() && v6.metadata.response_code == ResponseCode::NoError);
        let none =
            Message::from_vec(&answer(&ask("db.vm", RecordType::A), "vm", &lookup()).unwrap())
                .unwrap();
        assert_eq!(none.metadata.response_code, ResponseCode::NXDomain);
        assert!(answer(&ask("example.com", RecordType::A), "vm", &lookup()).is_none());
        assert!(answer(&ask("evm", RecordType::A), "vm", &lookup()).is_none());
        assert!(answer(b"garbage", "vm", &lookup()).is_none());
    }

    #[test]
    fn upstreams_skip_banger_itself() {
        let conf =
            "# x\nnameserver 10.213.0.1\nnameserver 192.0.2.53\nsearch lan\nnameserver ::1\n";
        let ups = upstreams(conf, Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(
            ups,
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
