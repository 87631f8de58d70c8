"""The op's front reads no device tensor's values (no host sync).

Without a GPU, the CPU stands in for a device: ``reading_syncs`` is patched
to say that reading a CPU tensor waits for the device, and every way of
reading tensor values on the host is patched to fail. The GPU half of the
proof (``torch.cuda.set_sync_debug_mode('error')`` and CUDA-graph capture)
is in ``test_ms_deform_attn_cuda.py``.
"""
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ddetr_plugin.ops import level_table, ms_deform_attn
from testkit import needs_extension

# Every Tensor method that hands values to the host.
READ_METHODS = ('tolist', 'item', 'numpy', '__int__', '__index__', '__float__',
                '__bool__', '__iter__')


class ValueRead(AssertionError):
    """A tensor's values were read on the host."""


@pytest.fixture(name='cpu_as_device')
def cpu_as_device_fixture(monkeypatch):
    """Treat CPU tensors like CUDA ones: reading them would sync."""
    monkeypatch.setattr(level_table, 'reading_syncs', lambda device: True)
    level_table.forget_checked_tables()
    yield
    level_table.forget_checked_tables()


@contextlib.contextmanager
def no_reads():
    """Within the block, any host read of a tensor's values raises."""
    with pytest.MonkeyPatch.context() as patch:
        for name in READ_METHODS:

            def read(*args, _name=name, **kwargs):
                raise ValueRead(f'Tensor.{_name} read values on the host')

            patch.setattr(torch.Tensor, name, read)
        yield


def call_with_backward(inputs):
    """Forward and backward; the level table is passed as it is (the same
    tensor objects, as a model passes them to its layers)."""
    leaves = [
        tensor.detach().clone().requires_grad_()
        if tensor.is_floating_point() else tensor for tensor in inputs
    ]
    output = ms_deform_attn(*leaves)
    output.sum().backward()
    return output


def test_a_checked_table_is_not_read_again(random_inputs, cpu_as_device):
    inputs = random_inputs()
    expected = call_with_backward(inputs)  # checks and remembers the table
    with no_reads():
        output = call_with_backward(inputs)
    torch.testing.assert_close(output, expected, atol=0, rtol=0)


def test_no_read_while_the_host_may_not_wait(random_inputs, cpu_as_device,
                                             monkeypatch):
    # As during CUDA-graph capture: a new table is checked on the device.
    monkeypatch.setattr(level_table, 'host_may_wait', lambda device: False)
    inputs = random_inputs()
    with no_reads():
        call_with_backward(inputs)


def test_the_device_check_catches_a_bad_table(random_inputs, cpu_as_device,
                                              monkeypatch):
    monkeypatch.setattr(level_table, 'host_may_wait', lambda device: False)
    inputs = random_inputs()
    inputs[2] = torch.tensor([0, 16, 15])  # 15 and 16 swapped
    # On the CPU the device-side assertion raises at once.
    with pytest.raises(RuntimeError, match='do not tile the 20 keys'):
        ms_deform_attn(*inputs)


def change_in_place(starts):
    starts[1:] = torch.tensor([16, 15])  # bumps the version counter


def replace_memory(starts):
    version = starts._version
    starts.data = torch.tensor([0, 16, 15])
    assert starts._version == version  # only the memory tells


def write_unseen(starts):
    version, pointer = starts._version, starts.data_ptr()
    starts.data[1:] = torch.tensor([16, 15])
    assert (starts._version, starts.data_ptr()) == (version, pointer)


@pytest.mark.parametrize(
    'change, error, message',
    [(change_in_place, ValueError, 'level_start_index must be'),
     (replace_memory, ValueError, 'level_start_index must be'),
     (write_unseen, RuntimeError, 'do not tile the 20 keys')],
    ids=['in-place', 'data-replaced', 'write-through-data'])
def test_a_table_changed_after_its_check_is_checked_again(
        random_inputs, cpu_as_device, change, error, message):
    # Changes the version counter sees, or the data pointer, get the host
    # check again; a write neither shows (through .data, DLPack) is caught
    # by the device check that every later call runs.
    inputs = random_inputs()
    ms_deform_attn(*inputs)
    change(inputs[2])
    with pytest.raises(error, match=message):
        ms_deform_attn(*inputs)


def test_a_new_value_size_is_checked_again(random_inputs, cpu_as_device):
    inputs = random_inputs()
    ms_deform_attn(*inputs)
    inputs[0] = inputs[0][:, :-1]
    with pytest.raises(ValueError, match='num_keys = 19'):
        ms_deform_attn(*inputs)


@needs_extension
def test_fake_cuda_tensors_are_not_read(random_inputs, monkeypatch):
    # Fake tensors on a CUDA device exist without a GPU; the front must
    # reach the op's fake kernel without reading any of them. (Forward
    # only: the autograd engine needs a real CUDA build for CUDA tensors.)
    from torch._subclasses.fake_tensor import FakeTensorMode
    front = pytest.importorskip('ddetr_plugin.ops.ms_deform_attn')
    monkeypatch.setattr(front, 'kernel_device_types',
                        lambda: frozenset({'cpu', 'cuda', 'meta'}))
    shapes = [tensor.shape for tensor in random_inputs(dtype=torch.float32)]
    with FakeTensorMode(), no_reads():
        value, locations, weights = [
            torch.randn(shapes[index], device='cuda') for index in (0, 3, 4)
        ]
        spatial_shapes = torch.empty(
            shapes[1], dtype=torch.int64, device='cuda')
        level_start_index = torch.empty(
            shapes[2], dtype=torch.int64, device='cuda')
        output = ms_deform_attn(value, spatial_shapes, level_start_index,
                                locations, weights)
        assert output.device.type == 'cuda'
        assert output.shape == (2, 3, 8)


# 2**62 * 4 wraps to 0 in int64, so the sizes 0 + 1 + 4 tile 5 keys there.
OVERFLOWING_TABLE = ([[2**62, 4], [1, 1], [2, 2]], [0, 0, 1], 5)


def test_an_inference_table_is_checked_at_every_call(random_inputs,
                                                     cpu_as_device):
    # Inference tensors have no version counter (reading it raises) and
    # may change in place unseen: they are checked on the device at every
    # call, never read on the host, never remembered.
    with torch.inference_mode():
        inputs = random_inputs()
        inputs[1] = inputs[1].clone()
        inputs[2] = inputs[2].clone()
        ms_deform_attn(*inputs)
        with no_reads():
            ms_deform_attn(*inputs)
        inputs[2][1:] = torch.tensor([16, 15])
        with pytest.raises(RuntimeError, match='do not tile the 20 keys'):
            ms_deform_attn(*inputs)


@pytest.mark.parametrize(
    'host_may_wait', [True, False], ids=['host', 'device'])
def test_an_overflowing_table_is_refused(cpu_as_device, monkeypatch,
                                         host_may_wait):
    monkeypatch.setattr(level_table, 'host_may_wait',
                        lambda device: host_may_wait)
    shapes, starts, num_keys = OVERFLOWING_TABLE
    error = ValueError if host_may_wait else RuntimeError
    with pytest.raises(error, match='tile'):
        level_table.check_level_table(
            torch.tensor(shapes), torch.tensor(starts), num_keys)


class SlowDeletionDict(dict):
    """A dict that yields to other threads before deleting, to widen the
    window between choosing the oldest entry and deleting it."""

    def __delitem__(self, key):
        time.sleep(0.002)
        super().__delitem__(key)


def test_threads_evict_from_a_full_cache_safely(cpu_as_device, monkeypatch,
                                                level_tensors):
    monkeypatch.setattr(level_table, '_checked', SlowDeletionDict())
    tables = []  # kept alive, so that no id is reused

    def check_new_tables(count):
        for _ in range(count):
            level_shapes = [(3, 5), (2, 2)]
            spatial_shapes, level_start_index, num_keys = level_tensors(
                level_shapes)
            tables.append((spatial_shapes, level_start_index))
            level_table.check_level_table(spatial_shapes, level_start_index,
                                          num_keys)

    check_new_tables(level_table._MAX_REMEMBERED)  # the cache is full
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(check_new_tables, 4) for _ in range(8)]
        for future in futures:
            future.result()  # re-raises a thread's KeyError
    assert len(level_table._checked) == level_table._MAX_REMEMBERED
