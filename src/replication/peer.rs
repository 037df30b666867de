//! One end of a replication: a database, reached through a client of its
//! server that shares Spiegel's connection pools.

use crate::couch::{CouchClient, SecretUrl};

/// A database of some server.
#[derive(Clone, Debug)]
pub struct Peer {
    /// A client of the database's server, with the URL's credentials.
    pub client: CouchClient,
    /// The database's name (decoded).
    pub db: String,
}

impl Peer {
    /// The database named by `url` (its last path segment), reached with
    /// `url`'s credentials over `pool`'s connections. None when the URL
    /// names no database.
    pub fn at(pool: &CouchClient, url: &SecretUrl) -> Option<Peer> {
        let full = url.expose();
        let path = full.path().trim_end_matches('/');
        let (server_path, segment) = path.rsplit_once('/')?;
        if segment.is_empty() {
            return None;
        }
        let db = percent_encoding::percent_decode_str(segment)
            .decode_utf8()
            .ok()?
            .into_owned();
        let mut server = full.clone();
        server.set_path(server_path);
        server.set_query(None);
        let server = SecretUrl::parse(server.as_str()).ok()?;
        Some(Peer {
            client: pool.at(&server),
            db,
        })
    }

    /// Where the database is, without credentials: part of the replication
    /// id.
    pub fn location(&self) -> String {
        let server = self.client.url().without_credentials();
        format!("{}/{}", server.as_str().trim_end_matches('/'), self.db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::couch::ClientOptions;

    #[test]
    fn the_last_segment_is_the_database_and_the_rest_the_server() {
        let pool = CouchClient::new(
            &SecretUrl::parse("http://a:b@127.0.0.1:5984").unwrap(),
            ClientOptions::default(),
        )
        .unwrap();
        let url = SecretUrl::parse("http://u:p@db.example.com:6984/prefix/users%2Fbob").unwrap();
        let peer = Peer::at(&pool, &url).unwrap();
        assert_eq!(peer.db, "users/bob");
        assert_eq!(
            peer.location(),
            "http://db.example.com:6984/prefix/users/bob"
        );
        assert!(Peer::at(&pool, &SecretUrl::parse("http://h:5984/").unwrap()).is_none());
    }
}
