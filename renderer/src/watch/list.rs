//! Reading the prefix at one revision: page by page (well under etcd's request size limit),
//! each key with its mod revision, and the store identity the pages were read from.

use std::time::Duration;

use etcd_client::GetOptions;
use registry::etcd::Member;

use super::Store;

/// Keys per page of a listing.
const PAGE: i64 = 2000;

/// The content of the prefix at one revision: the store it was read from, and key → value.
pub type Listing = (Store, Vec<(String, Vec<u8>)>);

/// Lists everything under `prefix` (`renderer status`, `--once`), each request bounded by
/// `timeout`.
pub async fn list(
    etcd: &Member,
    prefix: &str,
    timeout: Duration,
) -> Result<Listing, etcd_client::Error> {
    list_at(etcd, prefix, None, timeout).await
}

/// [`list`] at `revision` (None: the current one); fails if etcd compacted it away.
pub async fn list_at(
    etcd: &Member,
    prefix: &str,
    revision: Option<i64>,
    timeout: Duration,
) -> Result<Listing, etcd_client::Error> {
    let root = registry::key::root_prefix(prefix);
    let (store, entries) = list_root(etcd, &root, revision, timeout).await?;
    Ok((
        store,
        entries.into_iter().map(|e| (e.key, e.value)).collect(),
    ))
}

/// One key of a listing.
pub(super) struct Entry {
    pub(super) key: String,
    pub(super) value: Vec<u8>,
    pub(super) mod_revision: i64,
}

/// Lists the whole prefix `root` at one revision (`at`, or the current one), page by page.
pub(super) async fn list_root(
    etcd: &Member,
    root: &str,
    at: Option<i64>,
    timeout: Duration,
) -> Result<(Store, Vec<Entry>), etcd_client::Error> {
    let mut kv = etcd.client().kv_client();
    let end = prefix_end(root.as_bytes());
    let mut from = root.as_bytes().to_vec();
    let mut store: Option<Store> = None;
    let mut kvs = Vec::new();
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if let Some(rev) = store.map(|s| s.revision).or(at) {
            opts = opts.with_revision(rev);
        }
        let resp =
            registry::etcd::within(timeout, "etcd request", kv.get(from.clone(), Some(opts)))
                .await?;
        if store.is_none() {
            let mut s = header_store(resp.header());
            if let Some(rev) = at {
                s.revision = rev;
            }
            store = Some(s);
        }
        for item in resp.kvs() {
            kvs.push(Entry {
                key: String::from_utf8_lossy(item.key()).into_owned(),
                value: item.value().to_vec(),
                mod_revision: item.mod_revision(),
            });
        }
        match (resp.more(), resp.kvs().last()) {
            (true, Some(lastkv)) => {
                from = lastkv.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    let empty = Store {
        cluster_id: 0,
        raft_term: 0,
        revision: 0,
    };
    Ok((store.unwrap_or(empty), kvs))
}

pub(super) fn header_store(h: Option<&etcd_client::ResponseHeader>) -> Store {
    Store {
        cluster_id: h.map_or(0, |h| h.cluster_id()),
        raft_term: h.map_or(0, |h| h.raft_term()),
        revision: h.map_or(0, |h| h.revision()),
    }
}

/// The smallest key greater than every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/services/"), b"/services0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
