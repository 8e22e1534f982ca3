//! SQL database connections, shared by the auth key providers and the usage database sinks:
//! which drivers exist, how a connection is opened (with a connect timeout for the networked
//! ones) and how a Go-style MySQL DSN becomes the URL the Rust client takes.
//!
//! Every call here blocks: callers run it on their own threads, never on a worker. It must not
//! log or return the DSN (it may carry a password), and it holds no queries: each caller owns
//! its SQL.

use std::time::Duration;

use serde::Deserialize;

/// How long opening a PostgreSQL or MySQL/MariaDB connection may take before it fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DbDriver {
    Sqlite,
    Postgres,
    Mysql,
}

impl DbDriver {
    /// The driver a location names: a `postgres://` or `postgresql://` URL, a `mysql://` URL, or
    /// else a SQLite file path.
    pub fn of(location: &str) -> DbDriver {
        if location.starts_with("postgres://") || location.starts_with("postgresql://") {
            DbDriver::Postgres
        } else if location.starts_with("mysql://") {
            DbDriver::Mysql
        } else {
            DbDriver::Sqlite
        }
    }
}

/// An open connection of one of the drivers.
pub enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(Box<postgres::Client>),
    Mysql(Box<mysql::Conn>),
}

/// Opens a connection. `dsn` is a file path for SQLite, a URL or `key=value` string for
/// PostgreSQL (a `connect_timeout` in it wins over [`CONNECT_TIMEOUT`]), a `mysql://` URL for
/// MySQL. `io_timeout` bounds each read and write on MySQL; on PostgreSQL, whose client has no
/// read timeout, it becomes `TCP_USER_TIMEOUT` (unless the DSN sets one): data the server's host
/// stops acknowledging (a partition, a dead host) fails the call, a hung server that still
/// acknowledges does not.
pub fn connect(driver: DbDriver, dsn: &str, io_timeout: Option<Duration>) -> Result<Conn, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    Ok(match driver {
        DbDriver::Sqlite => Conn::Sqlite(rusqlite::Connection::open(dsn).map_err(|e| err(&e))?),
        DbDriver::Postgres => {
            let mut config: postgres::Config = dsn.parse().map_err(|e| err(&e))?;
            if config.get_connect_timeout().is_none() {
                config.connect_timeout(CONNECT_TIMEOUT);
            }
            if let Some(timeout) = io_timeout.filter(|_| config.get_tcp_user_timeout().is_none()) {
                config.tcp_user_timeout(timeout);
            }
            let client = config.connect(postgres::NoTls).map_err(|e| err(&e))?;
            Conn::Postgres(Box::new(client))
        }
        DbDriver::Mysql => {
            let opts = mysql::Opts::from_url(dsn).map_err(|e| err(&e))?;
            let opts = mysql::OptsBuilder::from_opts(opts)
                .tcp_connect_timeout(Some(CONNECT_TIMEOUT))
                .read_timeout(io_timeout)
                .write_timeout(io_timeout);
            Conn::Mysql(Box::new(mysql::Conn::new(opts).map_err(|e| err(&e))?))
        }
    })
}

/// Accepts a `mysql://` URL as is and converts a Go DSN
/// (`user:pass@tcp(host:port)/db?param=value`, as in the seed config) into one, without the Go
/// driver's parameters.
pub fn mysql_url(dsn: &str) -> Result<String, String> {
    if dsn.starts_with("mysql://") {
        return Ok(dsn.to_string());
    }
    let bad = || {
        "cannot read MySQL DSN: expected \"mysql://user:pass@host:3306/db\" or \"user:pass@tcp(host:3306)/db\""
            .to_string()
    };
    let (creds, rest) = match dsn.rsplit_once('@') {
        Some((creds, rest)) => (Some(creds), rest),
        None => (None, dsn),
    };
    let (addr, path) = if let Some(after) = rest.strip_prefix("tcp(") {
        after.split_once(')').ok_or_else(bad)?
    } else if let Some(path) = rest.strip_prefix('/') {
        ("127.0.0.1:3306", path)
    } else {
        return Err(bad());
    };
    let path = path.strip_prefix('/').unwrap_or(path);
    // Go driver parameters (parseTime, charset, loc, ...) mean nothing to the Rust client,
    // which would refuse them at connect time.
    let path = path.split('?').next().unwrap_or_default();
    let addr = if addr.is_empty() {
        "127.0.0.1:3306"
    } else {
        addr
    };
    let mut url = String::from("mysql://");
    if let Some(creds) = creds {
        url.push_str(creds);
        url.push('@');
    }
    url.push_str(addr);
    url.push('/');
    url.push_str(path);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_name_their_driver() {
        assert_eq!(DbDriver::of("./data/keys.db"), DbDriver::Sqlite);
        assert_eq!(DbDriver::of("postgres://u@h/d"), DbDriver::Postgres);
        assert_eq!(DbDriver::of("postgresql://u@h/d"), DbDriver::Postgres);
        assert_eq!(DbDriver::of("mysql://u@h/d"), DbDriver::Mysql);
    }

    #[test]
    fn mysql_dsns() {
        assert_eq!(
            mysql_url("user:pass@tcp(localhost:3306)/llmproxy").unwrap(),
            "mysql://user:pass@localhost:3306/llmproxy"
        );
        assert_eq!(
            mysql_url("root@tcp(127.0.0.1:3306)/test?parseTime=true").unwrap(),
            "mysql://root@127.0.0.1:3306/test"
        );
        assert_eq!(
            mysql_url("u:p@/db").unwrap(),
            "mysql://u:p@127.0.0.1:3306/db"
        );
        assert_eq!(mysql_url("mysql://r@h/d").unwrap(), "mysql://r@h/d");
        assert!(mysql_url("u:p@unix(/tmp/sock)/db").is_err());
    }

    #[test]
    fn an_unreachable_server_fails_within_the_connect_timeout() {
        // 192.0.2.0/24 (TEST-NET-1) is never routed: only the timeout ends the attempt.
        for (driver, dsn) in [
            (DbDriver::Postgres, "host=192.0.2.1 user=u dbname=d"),
            (DbDriver::Mysql, "mysql://u@192.0.2.1:3306/d"),
        ] {
            let started = std::time::Instant::now();
            assert!(connect(driver, dsn, None).is_err());
            assert!(
                started.elapsed() < CONNECT_TIMEOUT * 3,
                "{driver:?} took {:?}",
                started.elapsed()
            );
        }
    }
}
