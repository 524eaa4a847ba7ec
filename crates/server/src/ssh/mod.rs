//! The SSH front door (`--ssh-listen`, `--ssh-authorized-keys`).
//!
//! `ssh -p PORT NAME@HOST` attaches to the caller's live session NAME or
//! starts one; `ssh ... NAME@HOST COMMAND` runs COMMAND in a fresh session
//! of its own and exits with its status; `ssh -L P:localhost:PORT ...`
//! reaches PORT on session NAME's own loopback. Users log in with a public
//! key listed in the authorized_keys file, and the key's comment is who
//! they are: the identity `ssh:COMMENT` owns their sessions and signs
//! their audit events, with the `run` scope and no more. Passwords and
//! keyboard-interactive are not offered; nothing else (sftp, scp, remote
//! forwards, agent or X11 forwarding) is either.
//!
//! This door calls the same service methods as the HTTP API and the
//! WebSocket: what a principal may do is decided there, once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentvm_store::ApiKey;
use russh::keys::PrivateKey;
use russh::server::{Auth, Handler, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::sync::Semaphore;

use crate::service::{Principal, Service};

mod channel;
pub mod keys;

pub use keys::{fingerprint, host_key, host_key_path, AuthorizedKeys};

/// Connections served at once; past it new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Connections from one address that have not logged in yet: one
/// address cannot hold the door shut for everyone else.
pub const MAX_UNAUTHENTICATED_PER_IP: usize = 8;
/// How long a client may take to log in.
const LOGIN_GRACE: Duration = Duration::from_secs(30);
/// Channels (terminals and forwards) one connection may hold open.
const MAX_CHANNELS: usize = 8;
/// Messages russh queues per channel before it stops reading the
/// connection (each at most a 32 KiB packet): with the two limits above,
/// what a client can make the server hold is bounded (8 x 32 x 32 KiB).
const CHANNEL_QUEUE: usize = 32;

/// The door, ready to accept.
pub struct Door {
    svc: Arc<Service>,
    keys_path: PathBuf,
    config: Arc<russh::server::Config>,
    conns: Arc<Semaphore>,
    waiting: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One address's count of connections not logged in yet, given back when
/// the connection logs in or ends.
struct Waiting {
    ip: IpAddr,
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Waiting {
    fn take(map: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Waiting> {
        let mut g = lock(map);
        let n = g.entry(ip).or_insert(0);
        if *n >= MAX_UNAUTHENTICATED_PER_IP {
            return None;
        }
        *n += 1;
        Some(Waiting {
            ip,
            map: map.clone(),
        })
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut g = lock(&self.map);
        if let Some(n) = g.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.remove(&self.ip);
            }
        }
    }
}

impl Door {
    /// Check the authorized_keys file now (a bad one stops the server at
    /// start, with the line that is wrong) and build the door.
    pub fn new(
        svc: Arc<Service>,
        host_key: PrivateKey,
        keys_path: PathBuf,
    ) -> Result<(Door, usize), String> {
        let n = AuthorizedKeys::load(&keys_path)?.len();
        let mut methods = MethodSet::empty();
        methods.push(MethodKind::PublicKey);
        let config = russh::server::Config {
            server_id: russh::SshId::Standard(
                concat!("SSH-2.0-AgentVM_", env!("CARGO_PKG_VERSION")).into(),
            ),
            methods,
            auth_rejection_time: Duration::from_secs(1),
            // OpenSSH probes with "none" first: answer that one at once
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![host_key],
            max_auth_attempts: 6,
            // a detached-looking terminal may sit quiet for hours; dead
            // peers are found by keepalives instead
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 3,
            // keystrokes go out at once
            nodelay: true,
            channel_buffer_size: CHANNEL_QUEUE,
            ..Default::default()
        };
        Ok((
            Door {
                svc,
                keys_path,
                config: Arc::new(config),
                conns: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
                waiting: Arc::default(),
            },
            n,
        ))
    }

    /// Accept connections until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "ssh: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = self.conns.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "ssh: too many connections; closed one");
                continue;
            };
            let Some(waiting) = Waiting::take(&self.waiting, peer.ip()) else {
                tracing::warn!(%peer, "ssh: too many connections from one address not logged in; closed one");
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                me.connection(stream, peer, waiting).await;
                drop(permit);
            });
        }
    }

    async fn connection(&self, stream: tokio::net::TcpStream, peer: SocketAddr, waiting: Waiting) {
        let _ = stream.set_nodelay(true);
        // read for every connection: a key removed from the file is
        // refused from the next login on, without a restart
        let keys = match AuthorizedKeys::load(&self.keys_path) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "ssh: the authorized keys cannot be read; refusing every login until they are fixed");
                AuthorizedKeys::default()
            }
        };
        let authed = Arc::new(AtomicBool::new(false));
        let conn = Conn {
            waiting: Some(waiting),
            svc: self.svc.clone(),
            keys,
            peer,
            user: String::new(),
            who: None,
            authed: authed.clone(),
            channels: Arc::new(Semaphore::new(MAX_CHANNELS)),
        };
        let running = match russh::server::run_stream(self.config.clone(), stream, conn).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "ssh: handshake failed");
                return;
            }
        };
        let h = running.handle();
        let grace = async {
            tokio::time::sleep(LOGIN_GRACE).await;
            if !authed.load(Ordering::SeqCst) {
                let _ = h
                    .disconnect(
                        russh::Disconnect::ByApplication,
                        "no login within 30 s".into(),
                        String::new(),
                    )
                    .await;
            }
            std::future::pending::<()>().await
        };
        tokio::pin!(running);
        tokio::select! {
            r = &mut running => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "ssh: connection ended");
                }
            }
            _ = grace => {}
        }
    }
}

/// One client connection.
struct Conn {
    svc: Arc<Service>,
    keys: AuthorizedKeys,
    peer: SocketAddr,
    /// The user name asked for: the session's name.
    user: String,
    who: Option<Principal>,
    authed: Arc<AtomicBool>,
    channels: Arc<Semaphore>,
    waiting: Option<Waiting>,
}

/// The principal an SSH identity acts as: its own owner, `run` scope.
fn principal(identity: &str, peer: SocketAddr) -> Principal {
    Principal {
        key: ApiKey {
            id: format!("ssh:{identity}"),
            name: identity.to_string(),
            hash: Vec::new(),
            scopes: vec!["run".into()],
            source: "ssh".into(),
            created_at: 0,
            revoked_at: None,
            network: None,
        },
        client: format!("ssh {peer}"),
    }
}

impl Conn {
    /// Who may open a channel now, and one of the connection's channel
    /// slots: none before login or past the limit.
    fn channel_slot(&self) -> Option<(Principal, tokio::sync::OwnedSemaphorePermit)> {
        let p = self.who.clone()?;
        let permit = self.channels.clone().try_acquire_owned().ok()?;
        Some((p, permit))
    }
}

impl Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(match self.keys.identity(offer.public_key) {
            Some(_) => Auth::Accept,
            None => Auth::reject(),
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let Some(identity) = self.keys.identity(key.public_key) else {
            tracing::info!(peer = %self.peer, key = %fingerprint(key.public_key), "ssh: refused a key that is not authorized");
            return Ok(Auth::reject());
        };
        let p = principal(identity, self.peer);
        self.svc
            .record(
                &p,
                "ssh.login",
                None,
                "ok",
                Some(&fingerprint(key.public_key)),
            )
            .await;
        self.user = agentvm_store::bounded(user, 200).into_owned();
        self.who = Some(p);
        self.authed.store(true, Ordering::SeqCst);
        self.waiting = None;
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some((p, permit)) = self.channel_slot() else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        reply.accept().await;
        let (svc, user, h) = (self.svc.clone(), self.user.clone(), session.handle());
        tokio::spawn(async move {
            channel::session(svc, p, user, channel, h).await;
            drop(permit);
        });
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some((p, permit)) = self.channel_slot() else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        let refuse = |why: String| ChannelOpenFailure::Other {
            code: 1, // SSH_OPEN_ADMINISTRATIVELY_PROHIBITED
            reason: why,
        };
        if !crate::service::valid_name(&self.user) {
            reply
                .reject(refuse("the user name is not a session name".into()))
                .await;
            return Ok(());
        }
        // only the session's own loopback: anything else is not ours to reach
        if !matches!(host_to_connect, "localhost" | "127.0.0.1" | "::1") {
            let why = format!(
                "agentvm forwards only to localhost inside session {}, not to {}",
                self.user,
                agentvm_store::bounded(host_to_connect, 64)
            );
            self.svc
                .record(
                    &p,
                    "session.forward",
                    Some(&self.user),
                    "rejected 403",
                    Some(&why),
                )
                .await;
            reply.reject(refuse(why)).await;
            return Ok(());
        }
        let Ok(port) = u16::try_from(port_to_connect) else {
            reply.reject(refuse("no such port".into())).await;
            return Ok(());
        };
        match self.svc.forward(&p, &self.user, port).await {
            Ok(stream) => {
                reply.accept().await;
                tokio::spawn(async move {
                    let mut ch = channel.into_stream();
                    let mut st = stream;
                    let _ = tokio::io::copy_bidirectional(&mut ch, &mut st).await;
                    drop(permit);
                });
            }
            Err(e) => reply.reject(refuse(e.to_string())).await,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_may_keep_only_a_few_connections_waiting() {
        let map = Arc::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let mut held: Vec<_> = (0..MAX_UNAUTHENTICATED_PER_IP)
            .filter_map(|_| Waiting::take(&map, a))
            .collect();
        assert_eq!(held.len(), MAX_UNAUTHENTICATED_PER_IP);
        assert!(Waiting::take(&map, a).is_none(), "one too many");
        assert!(
            Waiting::take(&map, b).is_some(),
            "another address is not held up"
        );
        held.pop();
        assert!(Waiting::take(&map, a).is_some(), "a slot comes back");
        drop(held);
        assert!(lock(&map).is_empty(), "nothing kept for addresses gone");
    }
}
