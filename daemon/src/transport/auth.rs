//! Mutual authentication of replica connections with a shared cluster secret.
//!
//! Owns the secret ([`ClusterSecret`]), nonces, and the HMAC-SHA256 proofs of
//! a 3-message challenge–response that both ends run before any data op:
//!
//! ```text
//!  client (engine)                                 server (replica node)
//!    nonce_c = random 32 bytes
//!    Hello { node, nonce_c }  ─────────────────▶   nonce_s = random 32 bytes
//!                                                  proof_s = HMAC(secret, "server", nonce_s, nonce_c)
//!                             ◀─────────────────   Challenge { nonce_s, proof_s }
//!    verify proof_s (else close)
//!    proof_c = HMAC(secret, "client", nonce_c, nonce_s)
//!    Proof { proof_c }        ─────────────────▶   verify proof_c (else close)
//!                             ◀─────────────────   Ok; data ops accepted from here on
//! ```
//!
//! Why this shape: each side proves knowledge of the secret over a nonce the
//! *other* side just chose, so recorded handshakes cannot be replayed; the
//! role string is inside the MAC, so a server's proof can never be reflected
//! back as a client's (or vice versa), even if a peer echoes our own nonce.
//! Proofs are compared in constant time (`Mac::verify_slice`). The server
//! sends its proof first, so a client never reveals a proof to a server that
//! has not shown it holds the secret; a server reveals one only over a nonce
//! it chose itself, which a client cannot reuse as its own proof.
//!
//! This authenticates; it does not encrypt (replica traffic is expected on a
//! trusted storage network, as in Longhorn). The server's state machine that
//! refuses data ops before the handshake completes lives with the server.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::wire::Op;

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret accepted: 16 bytes (128 bits).
pub const MIN_SECRET_LEN: usize = 16;

/// Role strings mixed into the proofs.
pub const ROLE_CLIENT: &[u8] = b"client";
pub const ROLE_SERVER: &[u8] = b"server";

/// Domain separation: these MACs can never be confused with another use of
/// the same secret.
const DOMAIN: &[u8] = b"cairn replica auth v1\0";

pub type Nonce = [u8; 32];
pub type ProofBytes = [u8; 32];

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read cluster secret {path}: {source}; create it with e.g. `head -c 32 /dev/urandom | base64 > {path}` on every node")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cluster secret {path} is {len} bytes after trimming whitespace, at least {MIN_SECRET_LEN} are needed; write a longer random secret (e.g. `head -c 32 /dev/urandom | base64`) to it on every node")]
    TooShort { path: PathBuf, len: usize },
    #[error("peer failed authentication: its proof does not match the cluster secret (is the same secret installed on both nodes?)")]
    BadProof,
    #[error("handshake: expected {expected}, peer sent {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    #[error("cannot read random bytes for a nonce: {0}")]
    Random(std::io::Error),
}

/// The cluster-wide shared secret, held as a keyed HMAC (the key schedule is
/// computed once at load; each proof clones it). `Debug` does not show it.
#[derive(Clone)]
pub struct ClusterSecret {
    mac: HmacSha256,
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

impl ClusterSecret {
    /// Loads the secret from `path`: its contents with surrounding whitespace
    /// trimmed (so `echo secret > file` works), at least [`MIN_SECRET_LEN`]
    /// bytes.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let mut raw = std::fs::read(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        let secret = Self::from_bytes(raw.trim_ascii()).map_err(|len| AuthError::TooShort {
            path: path.to_owned(),
            len,
        });
        // Best effort: do not leave the secret in freed heap memory.
        raw.fill(0);
        secret
    }

    /// A secret from bytes (used as is, not trimmed); `Err(len)` when shorter
    /// than [`MIN_SECRET_LEN`].
    pub fn from_bytes(secret: &[u8]) -> Result<Self, usize> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(secret.len());
        }
        // HMAC takes keys of any length; `Err` is impossible here, and is
        // reported as a too-short key rather than a panic.
        let mac = <HmacSha256 as KeyInit>::new_from_slice(secret).map_err(|_| secret.len())?;
        Ok(ClusterSecret { mac })
    }

    fn keyed(&self, role: &[u8], prover_nonce: &Nonce, verifier_nonce: &Nonce) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(DOMAIN);
        // Length-prefixed so that no two (role, nonces) inputs share a byte string.
        mac.update(&(role.len() as u32).to_le_bytes());
        mac.update(role);
        mac.update(prover_nonce);
        mac.update(verifier_nonce);
        mac
    }
}

/// The proof a peer in `role` sends: HMAC over its own nonce and the peer's.
pub fn proof(
    secret: &ClusterSecret,
    role: &[u8],
    my_nonce: &Nonce,
    peer_nonce: &Nonce,
) -> ProofBytes {
    let out = secret
        .keyed(role, my_nonce, peer_nonce)
        .finalize()
        .into_bytes();
    let mut proof = [0; 32];
    proof.copy_from_slice(&out);
    proof
}

/// Checks, in constant time, a proof made by a peer in `role` whose nonce is
/// `prover_nonce`, over our `verifier_nonce`.
pub fn verify(
    secret: &ClusterSecret,
    role: &[u8],
    prover_nonce: &Nonce,
    verifier_nonce: &Nonce,
    proof: &ProofBytes,
) -> Result<(), AuthError> {
    secret
        .keyed(role, prover_nonce, verifier_nonce)
        .verify_slice(proof)
        .map_err(|_| AuthError::BadProof)
}

/// 32 bytes from the kernel's CSPRNG.
pub fn new_nonce() -> Result<Nonce, AuthError> {
    let mut nonce = [0; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut nonce))
        .map_err(AuthError::Random)?;
    Ok(nonce)
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Hello { .. } => "Hello",
        Op::Challenge { .. } => "Challenge",
        Op::Proof { .. } => "Proof",
        Op::Error { .. } => "Error",
        _ => "a data op",
    }
}

/// The client's side of the handshake.
pub struct ClientHandshake {
    nonce: Nonce,
}

impl ClientHandshake {
    /// Starts a handshake; returns it and the `Hello` to send.
    pub fn start(node: &str) -> Result<(Self, Op), AuthError> {
        let nonce = new_nonce()?;
        Ok((
            ClientHandshake { nonce },
            Op::Hello {
                node: node.to_owned(),
                nonce,
            },
        ))
    }

    /// Checks the server's `Challenge`; returns the `Proof` to send.
    pub fn on_challenge(self, secret: &ClusterSecret, op: &Op) -> Result<Op, AuthError> {
        let Op::Challenge {
            nonce: server_nonce,
            proof: server_proof,
        } = op
        else {
            return Err(AuthError::Unexpected {
                expected: "Challenge",
                got: op_name(op),
            });
        };
        verify(secret, ROLE_SERVER, server_nonce, &self.nonce, server_proof)?;
        Ok(Op::Proof {
            proof: proof(secret, ROLE_CLIENT, &self.nonce, server_nonce),
        })
    }
}

/// The server's side of the handshake.
pub struct ServerHandshake {
    client_nonce: Nonce,
    nonce: Nonce,
    /// The peer's node name from `Hello`, for logs once authenticated.
    pub node: String,
}

impl ServerHandshake {
    /// Answers a client's `Hello`; returns the state and the `Challenge` to send.
    pub fn on_hello(secret: &ClusterSecret, op: &Op) -> Result<(Self, Op), AuthError> {
        let Op::Hello {
            node,
            nonce: client_nonce,
        } = op
        else {
            return Err(AuthError::Unexpected {
                expected: "Hello",
                got: op_name(op),
            });
        };
        let nonce = new_nonce()?;
        let challenge = Op::Challenge {
            nonce,
            proof: proof(secret, ROLE_SERVER, &nonce, client_nonce),
        };
        Ok((
            ServerHandshake {
                client_nonce: *client_nonce,
                nonce,
                node: node.clone(),
            },
            challenge,
        ))
    }

    /// Checks the client's `Proof`; `Ok` means the peer holds the secret.
    pub fn on_proof(&self, secret: &ClusterSecret, op: &Op) -> Result<(), AuthError> {
        let Op::Proof { proof } = op else {
            return Err(AuthError::Unexpected {
                expected: "Proof",
                got: op_name(op),
            });
        };
        verify(secret, ROLE_CLIENT, &self.client_nonce, &self.nonce, proof)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests {
    use super::*;
    use crate::transport::wire::{decode_frame, encode_frame, Decoded, Header};

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::from_bytes(s.as_bytes()).expect("secret")
    }

    /// Sends `op` through the real codec, as the handshake will over TCP.
    fn over_wire(op: Op) -> Op {
        let mut buf = Vec::new();
        encode_frame(&mut buf, &Header { request_id: 0, op }, &[]).expect("encode");
        match decode_frame(&buf).expect("decode") {
            Decoded::Frame { header, .. } => header.op,
            Decoded::Incomplete { .. } => panic!("incomplete"),
        }
    }

    #[test]
    fn handshake_succeeds_with_the_same_secret() {
        let s_client = secret("0123456789abcdef-cluster");
        let s_server = secret("0123456789abcdef-cluster");
        let (client, hello) = ClientHandshake::start("node-a").expect("start");
        let (server, challenge) =
            ServerHandshake::on_hello(&s_server, &over_wire(hello)).expect("hello");
        assert_eq!(server.node, "node-a");
        let proof = client
            .on_challenge(&s_client, &over_wire(challenge))
            .expect("server proof accepted");
        server
            .on_proof(&s_server, &over_wire(proof))
            .expect("client proof accepted");
    }

    #[test]
    fn client_rejects_a_server_with_another_secret() {
        let (client, hello) = ClientHandshake::start("node-a").expect("start");
        let (_server, challenge) =
            ServerHandshake::on_hello(&secret("a-different-secret!!"), &hello).expect("hello");
        let err = client
            .on_challenge(&secret("0123456789abcdef-cluster"), &challenge)
            .unwrap_err();
        assert!(matches!(err, AuthError::BadProof), "{err}");
    }

    #[test]
    fn server_rejects_a_client_with_another_secret() {
        let good = secret("0123456789abcdef-cluster");
        let bad = secret("a-different-secret!!");
        let (_client, hello) = ClientHandshake::start("node-a").expect("start");
        let (server, challenge) = ServerHandshake::on_hello(&good, &hello).expect("hello");
        let Op::Challenge {
            nonce: server_nonce,
            ..
        } = challenge
        else {
            panic!("not a challenge")
        };
        let Op::Hello {
            nonce: client_nonce,
            ..
        } = hello
        else {
            panic!("not a hello")
        };
        // A client that skips verifying the server (or an attacker) and
        // answers with the wrong secret.
        let forged = Op::Proof {
            proof: proof(&bad, ROLE_CLIENT, &client_nonce, &server_nonce),
        };
        assert!(matches!(
            server.on_proof(&good, &forged),
            Err(AuthError::BadProof)
        ));
    }

    #[test]
    fn a_reflected_server_proof_is_not_a_client_proof() {
        let s = secret("0123456789abcdef-cluster");
        let (_client, hello) = ClientHandshake::start("node-a").expect("start");
        let (server, challenge) = ServerHandshake::on_hello(&s, &hello).expect("hello");
        let Op::Challenge {
            proof: server_proof,
            ..
        } = challenge
        else {
            panic!("not a challenge")
        };
        assert!(matches!(
            server.on_proof(
                &s,
                &Op::Proof {
                    proof: server_proof
                }
            ),
            Err(AuthError::BadProof)
        ));
    }

    #[test]
    fn out_of_order_messages_are_rejected() {
        let s = secret("0123456789abcdef-cluster");
        assert!(matches!(
            ServerHandshake::on_hello(&s, &Op::Ping),
            Err(AuthError::Unexpected { .. })
        ));
        let (client, _) = ClientHandshake::start("n").expect("start");
        assert!(matches!(
            client.on_challenge(&s, &Op::Ok),
            Err(AuthError::Unexpected { .. })
        ));
    }

    #[test]
    fn load_trims_and_checks_length_and_debug_hides_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "  0123456789abcdef-cluster\n").expect("write");
        let loaded = ClusterSecret::load(&path).expect("load");
        let direct = secret("0123456789abcdef-cluster");
        let n = [7; 32];
        assert_eq!(
            proof(&loaded, ROLE_CLIENT, &n, &n),
            proof(&direct, ROLE_CLIENT, &n, &n)
        );
        assert!(!format!("{loaded:?}").contains("0123"));

        std::fs::write(&path, "short\n").expect("write");
        let err = ClusterSecret::load(&path).unwrap_err();
        assert!(matches!(err, AuthError::TooShort { len: 5, .. }));
        assert!(err.to_string().contains(&path.display().to_string()));

        let err = ClusterSecret::load(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, AuthError::Read { .. }));
        assert!(err.to_string().contains("missing"));
    }

    #[test]
    fn proofs_depend_on_role_and_nonce_order() {
        let s = secret("0123456789abcdef-cluster");
        let (a, b) = ([1; 32], [2; 32]);
        let p = proof(&s, ROLE_CLIENT, &a, &b);
        assert_ne!(p, proof(&s, ROLE_SERVER, &a, &b));
        assert_ne!(p, proof(&s, ROLE_CLIENT, &b, &a));
        verify(&s, ROLE_CLIENT, &a, &b, &p).expect("verify");
    }
}
