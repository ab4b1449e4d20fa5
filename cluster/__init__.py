"""raftmesh.cluster"""
