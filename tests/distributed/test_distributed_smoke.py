from distributed import run_distributed


def _ranks():
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()


def test_spawn_two_ranks():
    assert run_distributed(_ranks, world=2, tp=2) == [(0, 0), (1, 0)]
