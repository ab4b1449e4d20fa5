"""raftmesh.chaos"""
