"""A rank entry for the launch tests: every rank reports its index and the jobs it received."""
import sys

from accelerate import PartialState
from accelerate.utils import gather_object

from nifi_utils.core.launch import finish_rank, rank_jobs

if __name__ == "__main__":
    jobs_path, results_path = sys.argv[1:]
    state = PartialState(cpu=True)
    jobs = rank_jobs(state, jobs_path)
    sys.exit(finish_rank(state, results_path, gather_object([(state.process_index, jobs)])))
