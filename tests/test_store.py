"""
The store of connected peers and the subscriptions between them.
"""

from twisted.trial import unittest

from relay.messages import peerID
from relay.store import Store
from tests.helpers import subscriptionCount

A, B, C = peerID("a"), peerID("b"), peerID("c")


class FakePeer:
    def __init__(self, pid):
        self.peerID = pid
        self.events = []

    def peersOnline(self, ids):
        self.events.append(("online", list(ids)))

    def peersWentOffline(self, ids):
        self.events.append(("offline", list(ids)))


class StoreTests(unittest.TestCase):
    def setUp(self):
        self.store = Store()

    def test_addAndGet(self):
        a = FakePeer(A)
        self.assertIsNone(self.store.add(a))
        self.assertIs(self.store.peers.get(A), a)
        self.assertEqual(len(self.store), 1)

    def test_replace(self):
        old, new = FakePeer(A), FakePeer(A)
        self.store.add(old)
        self.assertIs(self.store.add(new), old)
        self.assertIs(self.store.peers.get(A), new)

    def test_removeOnlyIfSame(self):
        old, new = FakePeer(A), FakePeer(A)
        self.store.add(old)
        self.store.add(new)
        self.assertFalse(self.store.remove(old))
        self.assertIs(self.store.peers.get(A), new)
        self.assertTrue(self.store.remove(new))
        self.assertIsNone(self.store.peers.get(A))
        self.assertFalse(self.store.remove(new))

    def test_subscribeReportsOnline(self):
        watcher, b = FakePeer(C), FakePeer(B)
        self.store.add(b)
        self.assertEqual(self.store.subscribe(watcher, [A, B]), [B])

    def test_onlineInterestConsumedOnce(self):
        watcher = FakePeer(C)
        self.store.subscribe(watcher, [A])
        self.store.cameOnline(A)
        self.store.cameOnline(A)
        self.assertEqual(watcher.events, [("online", [A])])

    def test_offlineInterestKept(self):
        watcher = FakePeer(C)
        self.store.subscribe(watcher, [A])
        self.store.wentOffline(A)
        self.store.cameOnline(A)
        self.store.wentOffline(A)
        self.assertEqual(watcher.events, [("offline", [A]), ("online", [A]), ("offline", [A])])

    def test_unsubscribe(self):
        watcher = FakePeer(C)
        self.store.subscribe(watcher, [A, B])
        self.store.unsubscribe(watcher, [A])
        self.store.cameOnline(A)
        self.store.wentOffline(A)
        self.store.cameOnline(B)
        self.assertEqual(watcher.events, [("online", [B])])

    def test_dropSubscriber(self):
        watcher = FakePeer(C)
        self.store.subscribe(watcher, [A])
        self.store.dropSubscriber(watcher)
        self.store.cameOnline(A)
        self.assertEqual(watcher.events, [])
        self.assertEqual(self.store._interested, {})

    def test_takeOnlineInterest(self):
        watcher = FakePeer(C)
        self.store.subscribe(watcher, [A])
        self.assertTrue(self.store.takeOnlineInterest(watcher, A))
        self.assertFalse(self.store.takeOnlineInterest(watcher, A))
        self.store.cameOnline(A)
        self.assertEqual(watcher.events, [])

    def test_manySubscribersInOrder(self):
        watchers = [FakePeer(peerID(f"w{i}")) for i in range(3)]
        for w in watchers:
            self.store.subscribe(w, [A])
        self.store.cameOnline(A)
        self.store.wentOffline(A)
        for w in watchers:
            self.assertEqual(w.events, [("online", [A]), ("offline", [A])])

    def test_subscribersComeAndGo(self):
        """
        An id's subscribers, one or several, each hear of it until they
        leave; the last one leaving forgets the id.
        """
        watchers = [FakePeer(peerID(f"w{i}")) for i in range(3)]
        for w in watchers:
            self.store.subscribe(w, [A, B])
            self.store.subscribe(w, [A])
        self.store.unsubscribe(watchers[0], [A])
        self.store.dropSubscriber(watchers[1])
        self.store.wentOffline(A)
        self.assertEqual([w.events for w in watchers], [[], [], [("offline", [A])]])
        self.store.subscribe(watchers[1], [A])
        self.store.wentOffline(A)
        self.assertEqual(watchers[1].events, [("offline", [A])])
        for w in watchers:
            self.store.dropSubscriber(w)
        self.assertEqual(self.store._interested, {})

    def test_soleSubscriberNeedsNoSet(self):
        """
        An id with one subscriber costs no set of its own (about half the
        memory of a subscription).
        """
        watcher = FakePeer(C)
        self.store.subscribe(watcher, [A, B])
        other = FakePeer(peerID("other"))
        self.store.subscribe(other, [B])
        self.assertEqual(
            [type(self.store._interested[pid]).__name__ for pid in (A, B)], ["Subscriber", "set"]
        )
        self.store.dropSubscriber(other)
        self.assertEqual(type(self.store._interested[B]).__name__, "Subscriber")


class SubscriptionLimitTests(unittest.TestCase):
    def setUp(self):
        self.store = Store(maxSubscriptions=2)
        self.a = FakePeer(A)

    def test_newIdsUpToTheLimit(self):
        self.assertEqual(self.store.admitSubscriptions(self.a, [A, B, C]), ([A, B], 1))
        self.store.subscribe(self.a, [A, B])
        self.assertEqual(self.store.admitSubscriptions(self.a, [C, B, A, C]), ([B, A], 2))
        self.assertEqual(subscriptionCount(self.store, self.a), 2)

    def test_duplicatesCountOnce(self):
        self.assertEqual(self.store.admitSubscriptions(self.a, [C, C, C, B, A]), ([C, C, C, B], 1))

    def test_consumedOnlineInterestStillCounts(self):
        self.store.subscribe(self.a, [B, C])
        self.store.add(FakePeer(B))
        self.store.cameOnline(B)
        self.assertEqual(self.store.admitSubscriptions(self.a, [A]), ([], 1))

    def test_unlimited(self):
        store = Store(maxSubscriptions=0)
        ids = [peerID(str(n)) for n in range(5000)]
        self.assertEqual(store.admitSubscriptions(self.a, ids), (ids, 0))
