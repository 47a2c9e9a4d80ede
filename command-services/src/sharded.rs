//! A hash map split into shards, each a `HashMap` of its own, for the owners' maps that grow
//! with the history (every aggregate, every remembered command outcome).
//!
//! A `HashMap` grows by moving every entry into a table twice the size, in one call: at 229,000
//! aggregates that insert took 57 ms here, at 459,000 125 ms. The owner's table sits behind
//! one lock that every command takes, so each doubling stalled every command and, with both
//! runtime workers waiting on the lock, everything else in the process (BENCHMARKS.md,
//! Commands). Split into [`SHARDS`] maps chosen by the key's hash, each insert moves at most
//! one shard, a 256th of the entries, and the shards grow at different inserts.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::collections::hash_map::{Entry, RandomState};
use std::hash::{BuildHasher, Hash};

/// How many maps the entries spread over.
pub const SHARDS: usize = 256;

/// See the module documentation. Iteration order is unspecified, as for `HashMap`.
#[derive(Debug)]
pub struct ShardedMap<K, V> {
    /// Chooses the shard; each shard hashes with its own seed.
    chooser: RandomState,
    shards: Box<[HashMap<K, V>]>,
}

impl<K, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        ShardedMap {
            chooser: RandomState::new(),
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
        }
    }
}

impl<K: Hash + Eq, V> ShardedMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    fn shard_of<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        // The top bits: each shard's own map indexes its buckets by the low bits of another
        // hash, so the two choices do not line up either way.
        (self.chooser.hash_one(key) >> (u64::BITS - SHARDS.trailing_zeros())) as usize
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard_of(key)].get(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let shard = self.shard_of(&key);
        self.shards[shard].insert(key, value)
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let shard = self.shard_of(key);
        self.shards[shard].remove(key)
    }

    pub fn entry(&mut self, key: K) -> Entry<'_, K, V> {
        let shard = self.shard_of(&key);
        self.shards[shard].entry(key)
    }

    /// Counts every shard's entries (a few hundred additions).
    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(HashMap::is_empty)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(HashMap::iter)
    }

    /// Every entry, taken out.
    pub fn into_entries(self) -> impl Iterator<Item = (K, V)> {
        self.shards.into_vec().into_iter().flatten()
    }

    /// Keeps the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        for shard in self.shards.iter_mut() {
            shard.retain(|key, value| keep(key, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same operations on a `HashMap` and a `ShardedMap` give the same answers.
    #[test]
    fn it_behaves_as_one_hash_map() {
        let mut sharded: ShardedMap<String, u64> = ShardedMap::new();
        let mut plain: HashMap<String, u64> = HashMap::new();
        // A deterministic walk of inserts, overwrites, removals and entries over 5,000 keys.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for step in 0..50_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = format!("agg-{}", x % 5_000);
            match x % 5 {
                0 | 1 => assert_eq!(sharded.insert(key.clone(), step), plain.insert(key, step)),
                2 => assert_eq!(sharded.remove(key.as_str()), plain.remove(key.as_str())),
                3 => {
                    *sharded.entry(key.clone()).or_default() += 1;
                    *plain.entry(key).or_default() += 1;
                }
                _ => assert_eq!(sharded.get(key.as_str()), plain.get(key.as_str())),
            }
            assert_eq!(
                sharded.contains_key(key_of(x)),
                plain.contains_key(key_of(x))
            );
        }
        assert_eq!(sharded.len(), plain.len());
        assert_eq!(sharded.is_empty(), plain.is_empty());
        let mut all: Vec<_> = sharded.iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort();
        let mut expected: Vec<_> = plain.into_iter().collect();
        expected.sort();
        assert_eq!(all, expected);
    }

    fn key_of(x: u64) -> &'static str {
        if x.is_multiple_of(2) {
            "agg-1"
        } else {
            "agg-2"
        }
    }

    #[test]
    fn the_entries_spread_over_the_shards() {
        let mut map = ShardedMap::new();
        for index in 0..SHARDS * 64 {
            map.insert(index, ());
        }
        let largest = map.shards.iter().map(HashMap::len).max().unwrap_or(0);
        // 64 on average; a uniform spread stays well under twice that.
        assert!(largest < 128, "{largest}");
        assert!(map.shards.iter().all(|shard| !shard.is_empty()));
    }
}
