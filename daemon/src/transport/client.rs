//! A blocking request/response connection to a peer's replica server: the
//! control plane's calls (node status, create/delete replica, revision) and a
//! rebuild's copy stream. The engine's I/O path uses `engine::remote`, which
//! pipelines; this one waits for each answer, bounded by a timeout.

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::auth::{AuthError, ClientHandshake, ClusterSecret};
use super::server::{send_frame, tune_socket};
use super::wire::{FrameReader, Header, Op, WireError};

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot reach replica server {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("replica server {addr}: {source}")]
    Wire { addr: String, source: WireError },
    #[error("replica server {addr} refused the handshake: {message}")]
    Refused { addr: String, message: String },
    #[error("replica server {addr}: {source}")]
    Auth { addr: String, source: AuthError },
    #[error("replica server {addr} closed the connection")]
    Closed { addr: String },
    #[error("replica server {addr}: {message}")]
    Remote {
        addr: String,
        errno: i32,
        message: String,
    },
    #[error("replica server {addr} answered {got} to {sent}")]
    Unexpected {
        addr: String,
        sent: String,
        got: String,
    },
}

impl PeerError {
    /// The errno to complete an I/O with when this error ends it.
    pub fn errno(&self) -> i32 {
        match self {
            PeerError::Remote { errno, .. } => *errno,
            PeerError::Connect { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }

    /// The peer refused because this owner session was fenced (or a claim
    /// lost to a newer owner): the caller no longer owns the volume.
    pub fn is_fenced(&self) -> bool {
        matches!(self, PeerError::Remote { errno, .. } if *errno == super::wire::FENCED_ERRNO)
    }
}

/// An authenticated connection, one request at a time.
pub struct PeerConn {
    addr: String,
    reader: FrameReader<TcpStream>,
    writer: TcpStream,
    buf: Vec<u8>,
    next_id: u64,
    /// A call failed mid-exchange (timeout, closed, garbled): the stream's
    /// position is unknown, so the connection must not be used again.
    broken: bool,
}

/// Resolves `addr` (host:port) to its first socket address.
pub fn resolve(addr: &str) -> io::Result<SocketAddr> {
    addr.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        )
    })
}

/// Connects to `addr` and authenticates, every step within `timeout`.
pub(crate) fn connect_stream(
    addr: &str,
    secret: &ClusterSecret,
    node: &str,
    timeout: Duration,
) -> Result<(TcpStream, FrameReader<TcpStream>), PeerError> {
    let connect_err = |source| PeerError::Connect {
        addr: addr.to_string(),
        source,
    };
    let sa = resolve(addr).map_err(connect_err)?;
    let stream = TcpStream::connect_timeout(&sa, timeout).map_err(connect_err)?;
    tune_socket(&stream);
    stream
        .set_read_timeout(Some(timeout))
        .map_err(connect_err)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(connect_err)?;
    let mut writer = stream.try_clone().map_err(connect_err)?;
    let mut reader = FrameReader::new(stream);
    let wire = |source| PeerError::Wire {
        addr: addr.to_string(),
        source,
    };
    let auth = |source| PeerError::Auth {
        addr: addr.to_string(),
        source,
    };
    let mut buf = Vec::new();
    let (hs, hello) = ClientHandshake::start(node).map_err(auth)?;
    send_frame(
        &mut writer,
        &mut buf,
        &Header {
            request_id: 0,
            op: hello,
        },
        &[],
    )
    .map_err(wire)?;
    let challenge = next(&mut reader, addr)?;
    let proof = hs.on_challenge(secret, &challenge).map_err(auth)?;
    send_frame(
        &mut writer,
        &mut buf,
        &Header {
            request_id: 1,
            op: proof,
        },
        &[],
    )
    .map_err(wire)?;
    match next(&mut reader, addr)? {
        Op::Ok => Ok((writer, reader)),
        Op::Error { message, .. } => Err(PeerError::Refused {
            addr: addr.to_string(),
            message,
        }),
        other => Err(PeerError::Unexpected {
            addr: addr.to_string(),
            sent: "Proof".into(),
            got: format!("{other:?}"),
        }),
    }
}

fn next(reader: &mut FrameReader<TcpStream>, addr: &str) -> Result<Op, PeerError> {
    match reader.next_frame() {
        Ok(Some((h, _))) => Ok(h.op),
        Ok(None) => Err(PeerError::Closed {
            addr: addr.to_string(),
        }),
        Err(source) => Err(PeerError::Wire {
            addr: addr.to_string(),
            source,
        }),
    }
}

impl PeerConn {
    pub fn connect(
        addr: &str,
        secret: &ClusterSecret,
        node: &str,
        timeout: Duration,
    ) -> Result<PeerConn, PeerError> {
        let (writer, reader) = connect_stream(addr, secret, node, timeout)?;
        Ok(PeerConn {
            addr: addr.to_string(),
            reader,
            writer,
            buf: Vec::new(),
            next_id: 2,
            broken: false,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether an earlier call broke the connection (see `broken`); the
    /// owner must open a new one.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Sends `op` with `payload` and returns the answer; an `Error` answer is
    /// returned as [`PeerError::Remote`]. The answer's payload is copied into
    /// `data` (cleared first).
    pub fn call_data(
        &mut self,
        op: Op,
        payload: &[u8],
        data: &mut Vec<u8>,
    ) -> Result<Op, PeerError> {
        if self.broken {
            return Err(PeerError::Closed {
                addr: self.addr.clone(),
            });
        }
        let r = self.exchange(op, payload, data);
        if matches!(
            r,
            Err(PeerError::Wire { .. } | PeerError::Closed { .. } | PeerError::Unexpected { .. })
        ) {
            // A late answer to this request would be read as the answer to
            // the next one: never reuse the stream.
            self.broken = true;
            let _ = self.writer.shutdown(std::net::Shutdown::Both);
        }
        r
    }

    fn exchange(&mut self, op: Op, payload: &[u8], data: &mut Vec<u8>) -> Result<Op, PeerError> {
        let id = self.next_id;
        self.next_id += 1;
        let wire = |source| PeerError::Wire {
            addr: self.addr.clone(),
            source,
        };
        let sent = format!("{op:?}");
        send_frame(
            &mut self.writer,
            &mut self.buf,
            &Header { request_id: id, op },
            payload,
        )
        .map_err(wire)?;
        let (header, body) = match self.reader.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) => {
                return Err(PeerError::Closed {
                    addr: self.addr.clone(),
                })
            }
            Err(source) => {
                return Err(PeerError::Wire {
                    addr: self.addr.clone(),
                    source,
                })
            }
        };
        if header.request_id != id {
            return Err(PeerError::Unexpected {
                addr: self.addr.clone(),
                sent,
                got: format!("an answer to request {} (expected {id})", header.request_id),
            });
        }
        data.clear();
        data.extend_from_slice(body);
        match header.op {
            Op::Error { errno, message } => Err(PeerError::Remote {
                addr: self.addr.clone(),
                errno,
                message,
            }),
            op => Ok(op),
        }
    }

    /// Writes several chunks pipelined: every request is sent before the
    /// first answer is read (answers are tiny, so neither side can block the
    /// other), then each answer must be `Ok`.
    pub fn write_many(&mut self, chunks: &[(u64, &[u8])]) -> Result<(), PeerError> {
        if self.broken {
            return Err(PeerError::Closed {
                addr: self.addr.clone(),
            });
        }
        let r = self.write_many_inner(chunks);
        if matches!(
            r,
            Err(PeerError::Wire { .. } | PeerError::Closed { .. } | PeerError::Unexpected { .. })
        ) || r.is_err()
        {
            // Answers to the rest of the burst may still be on the way.
            self.broken = true;
            let _ = self.writer.shutdown(std::net::Shutdown::Both);
        }
        r
    }

    fn write_many_inner(&mut self, chunks: &[(u64, &[u8])]) -> Result<(), PeerError> {
        let first = self.next_id;
        for (offset, data) in chunks {
            let id = self.next_id;
            self.next_id += 1;
            let h = Header {
                request_id: id,
                op: Op::Write {
                    offset: *offset,
                    fua: false,
                },
            };
            send_frame(&mut self.writer, &mut self.buf, &h, data).map_err(|source| {
                PeerError::Wire {
                    addr: self.addr.clone(),
                    source,
                }
            })?;
        }
        for i in 0..chunks.len() as u64 {
            let (header, _) = match self.reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => {
                    return Err(PeerError::Closed {
                        addr: self.addr.clone(),
                    })
                }
                Err(source) => {
                    return Err(PeerError::Wire {
                        addr: self.addr.clone(),
                        source,
                    })
                }
            };
            match header.op {
                Op::Ok if header.request_id == first + i => {}
                Op::Error { errno, message } => {
                    return Err(PeerError::Remote {
                        addr: self.addr.clone(),
                        errno,
                        message,
                    })
                }
                other => return Err(self.unexpected("Write".into(), other)),
            }
        }
        Ok(())
    }

    pub fn call(&mut self, op: Op) -> Result<Op, PeerError> {
        let mut none = Vec::new();
        self.call_data(op, &[], &mut none)
    }

    /// Calls and expects `Ok`.
    pub fn call_ok(&mut self, op: Op) -> Result<(), PeerError> {
        let sent = format!("{op:?}");
        match self.call(op)? {
            Op::Ok => Ok(()),
            other => Err(self.unexpected(sent, other)),
        }
    }

    pub(crate) fn unexpected(&self, sent: String, got: Op) -> PeerError {
        PeerError::Unexpected {
            addr: self.addr.clone(),
            sent,
            got: format!("{got:?}"),
        }
    }
}
