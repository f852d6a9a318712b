import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenised-data cache for every run of ``SMALL`` here: the BPE is trained and the corpus packed once."""
    return tmp_path_factory.mktemp("data_cache")
