"""The pool's page map as readers get it (issue 10): a copy equals `page_owner` exactly at the moment
it is taken, stays as it was while the pool moves on, and copies only the blocks that changed."""

import numpy as np
import torch

from lightllm_nb.kv.kv_pool import CACHED, SHARED, KVPool
from lightllm_nb.kv.page_maps import BLOCK_SHIFT, PageMapCopier

BLOCK = 1 << BLOCK_SHIFT


def make_pool(pages: int, page_size: int = 1) -> KVPool:
    return KVPool(num_layers=1, num_kv_heads=1, head_dim=1, num_tokens=pages * page_size, page_size=page_size,
                  max_requests=8, max_context=64, dtype=torch.float32, device=torch.device("cpu"))


def test_copies_equal_the_pool_when_taken_and_never_change_after():
    """Random allocations (one page, as a decode step takes, and many), frees and owner changes, with
    a copy after each: every copy equals the pool as it was then, read again at the end."""
    rng = np.random.default_rng(0)
    pool = make_pool(5 * BLOCK + 123)  # a short last block
    held: dict[int, list[int]] = {row: [] for row in range(8)}
    copies = []
    for _ in range(300):
        row = int(rng.integers(0, 8))
        action = rng.integers(0, 4)
        if action == 0 and held[row]:
            pool.free_pages(held[row])
            held[row] = []
        elif action == 1 and held[row]:
            pool.set_owner(held[row][: int(rng.integers(1, len(held[row]) + 1))], int(rng.choice([CACHED, SHARED])))
        else:
            pages = pool.alloc_pages(1 if action == 2 else int(rng.integers(2, 3 * BLOCK)), row)
            held[row] += pages or []
        copies.append((pool.page_map(), pool.page_owner.copy()))
    for copy, then in copies:
        assert np.array_equal(copy.array(), then)
        assert copy.array().dtype == np.int32 and len(copy) == pool.num_pages
    assert copies[-1][0].array() is copies[-1][0].array()  # joined once, shared by every reader


def test_a_copy_takes_only_the_blocks_that_changed():
    pool = make_pool(8 * BLOCK)
    first = pool.page_map()
    assert np.array_equal(first.array(), pool.page_owner)
    same = pool.page_map()
    assert all(a is b for a, b in zip(first.blocks, same.blocks))  # nothing changed: nothing copied
    page = pool.alloc_pages(1, owner=3)[0]
    pages = pool.alloc_pages(BLOCK + 1, owner=4)
    moved = pool.page_map()
    changed = [i for i, (a, b) in enumerate(zip(same.blocks, moved.blocks)) if a is not b]
    assert changed == sorted({page >> BLOCK_SHIFT} | {p >> BLOCK_SHIFT for p in pages})
    assert moved.array()[page] == 3 and first.array()[page] == -1
    assert not any(block.flags.writeable for block in moved.blocks)  # shared with later copies: read-only


def test_a_change_made_while_its_block_is_copied_is_in_the_next_copy():
    """A reader's copy (a panel's, when no step came for a while) may run while the step thread
    changes a page of the block being copied: the change must not be lost to later copies."""
    owners = np.full(3 * BLOCK, -1, dtype=np.int32)
    copier = PageMapCopier(owners)
    copier.take()
    changes = []

    class ChangedWhileCopied(np.ndarray):
        def copy(self, *args, **kwargs):
            taken = super().copy(*args, **kwargs)
            while changes:  # the step thread runs here: it changes a page, then marks its block
                changes.pop()()
            return taken

    def change(page, owner):
        owners[page] = owner
        copier.marks[page >> BLOCK_SHIFT] = 1

    copier.owners = owners.view(ChangedWhileCopied)
    change(BLOCK + 5, 7)
    changes.append(lambda: change(BLOCK + 6, 8))
    during = copier.take()
    assert during.array()[BLOCK + 5] == 7  # what came before the copy is in it
    after = copier.take()
    assert np.array_equal(after.array(), owners) and after.array()[BLOCK + 6] == 8
