"""Prefix cache: a radix tree over token ids whose nodes own KV pages, so requests that share a
prefix (a system prompt, a notebook's earlier turns, a resumed request's own tokens) compute it once.

The idea is SGLang's RadixAttention and LightLLM's radix cache. Each node holds a run of tokens
and the pages that hold their K/V. With page_size p > 1 the tree stores whole pages only: a node's
token count is a multiple of p, and a match is rounded down to whole pages, because a page is the
smallest thing two requests can share.

References: a request that uses a cached prefix *holds* the deepest node it matched, and with it
every node up to the root (`holders` is that set of req_to_token rows, so a node's reference count
is `len(holders)`). Only unreferenced leaves are evicted, least recently used first, and only
from their tail, so eviction can never take a page some request reads.

Requests give their pages to the tree twice: their prompt as soon as it is computed (so requests
arriving while it decodes hit it), and everything computed when they stop (finish, abort or
preemption, so a resumed request recomputes almost nothing). The tree knows a request only as its
row of req_to_token, its token ids, its pages and its user (the scope): never the request itself.

Scopes (see cache_scope.py): every node belongs to one scope, part of its key among its parent's
children, so a request walks, matches and inserts only nodes of its own scope, below the nodes of
a declared shared prefix (if its tokens start like one). A page enters the tree under the scope of
the request that computed it and leaves it only when freed, so no page ever crosses scopes, however
often it is evicted and handed out again.

Page owners in the pool (see kv_pool.py): an unreferenced cached page is CACHED, a page held by one
request shows that request's row, a page held by several shows SHARED.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from .cache_scope import DECLARED, CacheScopes
from .kv_pool import CACHED, SHARED, KVPool


class _Node:
    __slots__ = ("parent", "scope", "children", "tokens", "pages", "holders", "last_access")

    def __init__(self, parent: "_Node | None", scope: tuple, tokens: list[int], pages: list[int], last_access: int):
        self.parent = parent
        self.scope = scope
        self.children: dict[tuple, _Node] = {}  # keyed by the child's (scope, first page of tokens)
        self.tokens = tokens
        self.pages = pages
        self.holders: set[int] = set()
        self.last_access = last_access


@dataclass
class PrefixMatch:
    """The longest cached prefix of some tokens that a user may reuse: `length` tokens held in
    `pages`, the first `declared` of them from a declared shared prefix. Pass it to `hold` (a
    running request's row, until `release`) or `lock` / `unlock` (any row)."""

    node: _Node
    pages: list[int]
    length: int
    declared: int = 0
    next_scope: tuple = ()   # the scope the tokens after the match are cached under
    source: str = "own"      # what the rest is called: "own" or "shared" (never whose)

    def sources(self) -> dict[str, int]:
        """Reused tokens by where they came from, for decisions and panels."""
        counts = {"own": 0, "declared": self.declared, "shared": 0}
        counts[self.source] += self.length - self.declared
        return counts


class PrefixCache:
    def __init__(self, pool: KVPool, scopes: CacheScopes | None = None):
        self.pool = pool
        self.page_size = pool.page_size
        self.scopes = scopes if scopes is not None else CacheScopes()
        self._clock = itertools.count(1)      # logical time for LRU: deterministic, unlike wall time
        self._root = _Node(None, (), [], [], 0)
        self._num_nodes = 0
        self._num_pages = 0                   # pages the tree owns
        self._num_held_pages = 0              # of those, pages in nodes some request holds
        # Candidates for eviction: (last_access, tie, node). Entries go stale when a node is touched,
        # held, given children or removed; they are skipped when popped (cheaper than re-sorting).
        self._lru: list[tuple[int, int, _Node]] = []
        self._tie = itertools.count()
        self._held: dict[int, PrefixMatch] = {}   # row -> the prefix that running request holds

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def cached_tokens(self) -> int:
        """Tokens whose K/V the tree holds, in use or not."""
        return self._num_pages * self.page_size

    @property
    def reclaimable_pages(self) -> int:
        """Pages no request holds: eviction can turn them into free pages at any time."""
        return self._num_pages - self._num_held_pages

    @property
    def reclaimable_tokens(self) -> int:
        return self.reclaimable_pages * self.page_size

    # ---- lookups ---------------------------------------------------------------------------
    def match(self, token_ids: list[int], user: str = "default") -> PrefixMatch:
        """The longest prefix of `token_ids` cached in a scope `user` may read, in whole pages.
        Splits a node where the match ends inside it, so that the match can be held exactly."""
        p = self.page_size
        now = next(self._clock)
        node, pos, pages = self._root, 0, []
        zones = self._zones(token_ids, user, len(token_ids) // p * p)
        for scope, stop in zones:
            # The walk stops by its own condition where no child goes on: it cannot stay in place.
            while pos < stop and (child := node.children.get((scope, tuple(token_ids[pos:pos + p])))) is not None:
                common = self._common_pages(child.tokens, token_ids, pos, stop)
                if common < len(child.pages):
                    child = self._split(child, common)
                self._touch(child, now)
                pages.extend(child.pages)
                pos += common * p
                node = child
            if pos < stop:
                break  # a scope's part ends the match: the next part hangs below its end only
        (declared_scope, declared_end), (own_scope, _) = zones
        return PrefixMatch(node, pages, pos, declared=min(pos, declared_end),
                           next_scope=declared_scope if pos < declared_end else own_scope,
                           source=self.scopes.source_name())

    def lock(self, match: PrefixMatch, row: int) -> None:
        """Request `row` uses the matched prefix: none of it may be evicted until `unlock`."""
        node = match.node
        while node is not self._root:
            if row in node.holders:
                raise RuntimeError(f"row {row} already holds this prefix: unlock it before locking again")
            if not node.holders:
                self._num_held_pages += len(node.pages)
            node.holders.add(row)
            self._show_owner(node)
            node = node.parent

    def unlock(self, match: PrefixMatch, row: int) -> None:
        # The match's node may have been split since lock: it is then the lower half, and the
        # walk up still passes every node that holds `row`.
        node = match.node
        while node is not self._root:
            node.holders.remove(row)
            if not node.holders:
                self._num_held_pages -= len(node.pages)
                self._offer_for_eviction(node)
            self._show_owner(node)
            node = node.parent

    # ---- running requests, by row ----------------------------------------------------------
    # A running request is its row of req_to_token; `token_ids` are its tokens, the first
    # `num_computed` of them with K/V in `pages`, and `user` says its scope.
    def hold(self, row: int, match: PrefixMatch) -> None:
        """`row` starts from `match` (which may be empty: its pages are the request's first pages,
        its length the tokens it need not compute); it keeps it until `release`."""
        self.lock(match, row)
        self._held[row] = match

    def held(self, row: int) -> PrefixMatch:
        return self._held[row]

    def share_prompt(self, row: int, prompt_ids: list[int], pages: list[int], num_computed: int,
                     user: str) -> list[int] | None:
        """Put the computed whole pages of `row`'s prompt in the tree now rather than when it
        stops. Where another request cached the same tokens meanwhile, `row`'s duplicate pages are
        freed and its req_to_token points at the tree's: returns the tree's pages, which replace
        the first ones of `pages`; None when `pages` stay as they are."""
        p = self.page_size
        length = min(num_computed, len(prompt_ids)) // p * p
        held = self._held[row]
        if length <= held.length:
            return None
        duplicates = self.insert(prompt_ids[:length], pages[:length // p], user)
        self.unlock(held, row)
        match = self.match(prompt_ids[:length], user)
        self.lock(match, row)
        self._held[row] = match
        if not duplicates:
            return None
        self.pool.map_prefix(row, match.pages, length)
        self.pool.free_pages(duplicates)
        return match.pages

    def release(self, row: int, token_ids: list[int], pages: list[int], num_computed: int, user: str) -> None:
        """`row` stops using `pages`: its computed whole pages go into the tree (which keeps those
        new to it), the rest return to the pool, and its hold is dropped."""
        kept = min(num_computed // self.page_size, len(pages))
        duplicates = self.insert(token_ids[:kept * self.page_size], pages[:kept], user)
        self.pool.free_pages(duplicates + pages[kept:])
        self.unlock(self._held.pop(row), row)

    # ---- growing and shrinking -------------------------------------------------------------
    def insert(self, token_ids: list[int], pages: list[int], user: str = "default") -> list[int]:
        """Cache the K/V of `token_ids` (whole pages only), held in `pages`, one page per page of
        tokens, under the scopes of `user`, who computed them (or got them from this cache).

        The tree takes the pages of tokens new to it. Returns the pages it did not take: tokens
        another request cached meanwhile, whose duplicate pages the caller must free. Pages the
        caller got from this cache (a match) are the tree's own and are never returned.
        """
        p = self.page_size
        num_pages = min(len(pages), len(token_ids) // p)
        now = next(self._clock)
        duplicates: list[int] = []
        node, pos = self._root, 0
        for scope, stop in self._zones(token_ids, user, num_pages * p):
            while pos < stop:
                key = (scope, tuple(token_ids[pos:pos + p]))
                child = node.children.get(key)
                if child is None:
                    child = _Node(node, scope, list(token_ids[pos:stop]), list(pages[pos // p:stop // p]), now)
                    node.children[key] = child
                    self._num_nodes += 1
                    self._num_pages += len(child.pages)
                    self.pool.set_owner(child.pages, CACHED)
                    self._offer_for_eviction(child)
                    node, pos = child, stop
                    break
                common = self._common_pages(child.tokens, token_ids, pos, stop)
                if common < len(child.pages):
                    child = self._split(child, common)
                first = pos // p
                duplicates += [mine for mine, theirs in zip(pages[first:first + common], child.pages)
                               if mine != theirs]
                self._touch(child, now)
                pos += common * p
                node = child
        return duplicates

    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` unreferenced pages, least recently used leaves first, each from
        its tail (a long leaf loses only what is needed). Returns the number of pages freed."""
        freed = 0
        while freed < num_pages and self._lru:
            access, tie, node = heapq.heappop(self._lru)
            if not self._evictable(node) or node.last_access != access:
                continue
            take = min(len(node.pages), num_pages - freed)
            freed += take
            if take == len(node.pages):
                self._remove_leaf(node)
                continue
            gone = node.pages[-take:]
            del node.pages[-take:]
            del node.tokens[-take * self.page_size:]
            self.pool.free_pages(gone)
            self._num_pages -= take
            heapq.heappush(self._lru, (access, tie, node))
        return freed

    def clear(self) -> int:
        """Evict everything no request holds; returns the number of pages freed."""
        return self.evict(self.reclaimable_pages)

    # ---- internals -------------------------------------------------------------------------
    def _zones(self, token_ids: list[int], user: str, end: int) -> tuple[tuple[tuple, int], tuple[tuple, int]]:
        """The scopes `token_ids[:end]` are cached under, as (scope, end) parts: the whole pages
        they share with a declared prefix, then `user`'s scope."""
        declared = self.scopes.declared_length(token_ids) // self.page_size * self.page_size
        return (DECLARED, min(declared, end)), (self.scopes.key(user), end)

    def _key(self, node: _Node) -> tuple:
        return node.scope, tuple(node.tokens[:self.page_size])

    def _common_pages(self, node_tokens: list[int], token_ids: list[int], pos: int, end: int) -> int:
        n = min(len(node_tokens), end - pos)
        if token_ids[pos:pos + n] == node_tokens[:n]:  # the usual case, compared at C speed
            common = n
        else:
            common = next(i for i in range(n) if token_ids[pos + i] != node_tokens[i])
        if common < self.page_size:  # the node was found by its first page's tokens: a bug
            raise RuntimeError(f"prefix cache: the node keyed by the prompt's page at token {pos} "
                               "shares no page with it; splitting it at 0 would loop for ever")
        return common // self.page_size

    def _split(self, node: _Node, num_pages: int) -> _Node:
        """Cut `node` after `num_pages` pages; returns the new upper part. Holders and access time
        carry over to both halves, so references stay path-shaped."""
        cut = num_pages * self.page_size
        head = _Node(node.parent, node.scope, node.tokens[:cut], node.pages[:num_pages], node.last_access)
        head.holders = set(node.holders)
        node.parent.children[self._key(head)] = head
        node.tokens, node.pages, node.parent = node.tokens[cut:], node.pages[num_pages:], head
        head.children[self._key(node)] = node
        self._num_nodes += 1
        return head

    def _remove_leaf(self, node: _Node) -> None:
        parent = node.parent
        del parent.children[self._key(node)]
        node.parent = None
        self.pool.free_pages(node.pages)
        self._num_pages -= len(node.pages)
        self._num_nodes -= 1
        if parent is not self._root:
            self._offer_for_eviction(parent)

    def _touch(self, node: _Node, now: int) -> None:
        node.last_access = now
        self._offer_for_eviction(node)

    def _evictable(self, node: _Node) -> bool:
        return node.parent is not None and not node.children and not node.holders

    def _offer_for_eviction(self, node: _Node) -> None:
        if not self._evictable(node):
            return
        heapq.heappush(self._lru, (node.last_access, next(self._tie), node))
        if len(self._lru) > 64 + 4 * self._num_nodes:  # too many stale entries: drop them
            self._lru = [e for e in self._lru if self._evictable(e[2]) and e[2].last_access == e[0]]
            heapq.heapify(self._lru)

    def _show_owner(self, node: _Node) -> None:
        holders = node.holders
        owner = CACHED if not holders else next(iter(holders)) if len(holders) == 1 else SHARED
        self.pool.set_owner(node.pages, owner)
