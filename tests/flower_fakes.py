"""Stand-ins for Flower's client proxies and client manager: drive a strategy without Flower."""


class FakeProxy:
    def __init__(self, cid):
        self.cid = cid


class FakeManager:
    def __init__(self, proxies):
        self.proxies = proxies

    def num_available(self):
        return len(self.proxies)

    def sample(self, num_clients, min_num_clients=None):
        return self.proxies[:num_clients]
